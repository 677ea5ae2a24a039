//! `table-stub`: the table stand-in as a process, for benchmarks and manual runs until the supervisor exists.
//!
//! Usage: `table-stub --listen 127.0.0.1:9900 --service agente-vendedor [--policy '<json>'] id=ip:port[@weight]...`

use equilibrio_tests::table_server::{TableServer, endpoint};
use serde_json::Value;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut service, mut policy, mut endpoints) =
        ("127.0.0.1:9900".to_string(), "agente-vendedor".to_string(), Value::Null, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "--service" => service = args.next().unwrap_or(service),
            "--policy" => policy = serde_json::from_str(&args.next().unwrap_or_default())?,
            spec => {
                let (id, rest) = spec
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("bad endpoint `{spec}`: id=ip:port[@weight]"))?;
                let (addr, weight) = rest.split_once('@').unwrap_or((rest, "100"));
                endpoints.push(endpoint(id, addr.parse()?, weight.parse()?, "healthy"));
            }
        }
    }
    let server = TableServer::start_on(&listen, &service, endpoints, policy).await?;
    eprintln!("table-stub: serving `{service}` on {}", server.addr());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
