//! Several real supervisors on real etcd: a write through any node is every node's, the leader runs the health
//! checks and a new one takes over within the lease when it dies or stalls, and without etcd quorum writes are
//! refused (503), never falsely acknowledged.

// test code: a failed unwrap is a failed test
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use equilibrio_supervisor::config::EtcdConfig;
use equilibrio_supervisor::etcd::layout::Key;
use equilibrio_supervisor::etcd::store::EtcdStore;
use equilibrio_supervisor::leadership::{Fence, Leadership};
use equilibrio_supervisor::persist::PersistError;
use equilibrio_supervisor::registry::Registry;
use equilibrio_supervisor::store::{Change, Store};
use equilibrio_tests::backend::Backend;
use equilibrio_tests::containers::{Containers, IMAGE, docker_ready};
use equilibrio_tests::etcd::Etcd;
use equilibrio_tests::host::{Host, render_config_nodes};
use equilibrio_tests::supervisor::{Supervisor, wait_leading};
use serde_json::json;

const SERVICE: &str = "agente-vendedor";
/// The leader's lease in these tests.
const LEASE: Duration = Duration::from_secs(2);

fn service_yaml() -> String {
    format!(
        "environment: development\nservices:\n  {SERVICE}:\n    health_check: {{interval: 200ms, timeout: 100ms, retries: 2, rise: 1}}\n"
    )
}

async fn nodes(etcd: &Etcd, n: usize) -> Vec<Supervisor> {
    let store = etcd.store_yaml("/eq-test", "2s");
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Supervisor::start_node(&format!("node-{i}"), &store, &service_yaml()).await.unwrap());
    }
    v
}

/// The one node that leads, waiting up to `within` for there to be exactly one.
async fn leader(nodes: &[Supervisor], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let mut leading = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            if n.leads().await {
                leading.push(i);
            }
        }
        if leading.len() == 1 {
            return leading[0];
        }
        assert!(Instant::now() < deadline, "leaders: {leading:?} after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register(node: &Supervisor, backend: &Backend) -> u16 {
    let body = json!({"id": backend.id, "address": backend.addr.to_string()});
    node.call("POST", &format!("/v1/services/{SERVICE}/instances"), Some(body)).await.unwrap().0
}

/// The instance's state on `node` (`None`: not there).
async fn state(node: &Supervisor, id: &str) -> Option<String> {
    let v = node.get(&format!("/v1/services/{SERVICE}/instances")).await.ok()?;
    v.as_array()?.iter().find(|i| i["id"] == id).and_then(|i| i["state"].as_str()).map(str::to_string)
}

async fn wait_state_everywhere(nodes: &[&Supervisor], id: &str, wanted: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for n in nodes {
            all &= state(n, id).await.as_deref() == Some(wanted);
        }
        if all {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{id} is not {wanted} on every node after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_any_node_is_every_nodes_at_one_table_version_and_survives_that_nodes_kill() {
    let etcd = Etcd::start(1).await.unwrap();
    let mut nodes = nodes(&etcd, 3).await;
    let backend = Backend::start("av-1").await.unwrap();
    assert_eq!(register(&nodes[1], &backend).await, 201);
    // acknowledged by node 1: every node has it within a second
    let started = Instant::now();
    loop {
        let mut seen = 0;
        for n in &nodes {
            seen += usize::from(state(n, "av-1").await.is_some());
        }
        if seen == 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "seen by {seen} of 3 nodes after 1 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // the leader checks it, and only the leader (every 200 ms: about 10 checks in 2 s, not 30)
    wait_state_everywhere(&nodes.iter().collect::<Vec<_>>(), "av-1", "healthy", Duration::from_secs(5)).await;
    let before = backend.hits();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checks = backend.hits() - before;
    assert!((5..=15).contains(&checks), "{checks} health checks in 2 s");
    // every node serves the same table, at the same version
    let mut tables = Vec::new();
    for n in &nodes {
        tables.push(n.get(&format!("/v1/services/{SERVICE}/endpoints")).await.unwrap());
    }
    assert!(tables.windows(2).all(|w| w[0] == w[1]), "{tables:#?}");
    // every node shows the events, wherever they happened: the registration (node 1), the health (the leader)
    for n in &nodes {
        let events = n.event_history(SERVICE).await;
        assert!(events.contains("\"kind\":\"registered\"") && events.contains("\"kind\":\"healthy\""), "{events}");
    }
    // a policy change through node 2, then node 1 (which took the registration) is killed
    let (code, _) = nodes[2]
        .call("PUT", &format!("/v1/services/{SERVICE}/policy"), Some(json!({"algorithm": "least_connections"})))
        .await
        .unwrap();
    assert_eq!(code, 200);
    nodes[1].kill9();
    for i in [0, 2] {
        assert_eq!(state(&nodes[i], "av-1").await.as_deref(), Some("healthy"));
        let policy = nodes[i].get(&format!("/v1/services/{SERVICE}/policy")).await.unwrap();
        assert_eq!(policy["algorithm"], "least_connections", "node {i}");
    }
    // a node that starts later reads it all from etcd
    nodes[1].restart().await.unwrap();
    assert_eq!(state(&nodes[1], "av-1").await.as_deref(), Some("healthy"));
    // a proxy's report sent to a follower reaches the leader (its autoscaler and drains read them)
    let first = leader(&nodes, Duration::from_secs(5)).await;
    let follower = (first + 1) % 3;
    let version = nodes[follower].get(&format!("/v1/services/{SERVICE}/endpoints")).await.unwrap()["version"].clone();
    let report = json!({"service": SERVICE, "proxy": "p1", "table_version": version, "window_ms": 1000,
        "endpoints": [{"id": "av-1", "requests": 40, "errors": 0, "latency_sum_ms": 40.0, "latency_p95_ms": 2.0}]});
    assert_eq!(nodes[follower].call("POST", "/v1/reports", Some(report)).await.unwrap().0, 204);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let listed = nodes[first].get(&format!("/v1/services/{SERVICE}/instances")).await.unwrap();
        let requests =
            listed.as_array().unwrap().iter().find(|i| i["id"] == "av-1").unwrap()["traffic"]["requests_total"]
                .as_u64();
        if requests == Some(40) {
            break;
        }
        assert!(Instant::now() < deadline, "the leader never got the report: {requests:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_stalled_leader_is_replaced_within_the_lease_and_the_new_one_checks() {
    let etcd = Etcd::start(1).await.unwrap();
    let mut nodes = nodes(&etcd, 3).await;
    let (a, b) = (Backend::start("av-1").await.unwrap(), Backend::start("av-2").await.unwrap());
    assert_eq!(register(&nodes[0], &a).await, 201);
    assert_eq!(register(&nodes[0], &b).await, 201);
    let all: Vec<&Supervisor> = nodes.iter().collect();
    wait_state_everywhere(&all, "av-2", "healthy", Duration::from_secs(5)).await;

    // kill -9 of the leader: another node leads within the lease and a second
    let first = leader(&nodes, Duration::from_secs(5)).await;
    let killed_at = Instant::now();
    nodes[first].kill9();
    let rest: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    let survivors: Vec<&Supervisor> = rest.iter().map(|&i| &nodes[i]).collect();
    let second = wait_leading(&nodes, LEASE + Duration::from_secs(1)).await;
    let second = second.expect("no new leader within the lease and a second");
    assert!(killed_at.elapsed() < LEASE + Duration::from_secs(1), "no new leader within the lease and a second");
    // the new leader checks: a backend killed now is unhealthy on every node within interval x retries and a bit
    b.kill();
    wait_state_everywhere(&survivors, "av-2", "unhealthy", Duration::from_secs(3)).await;

    // SIGSTOP of the new leader for longer than its lease: the third node takes over; woken, the old one does not
    // lead, and the health it would have written does not come back
    let third = rest.into_iter().find(|&i| i != second).unwrap();
    nodes[second].pause(true);
    let paused_at = Instant::now();
    while !nodes[third].leads().await {
        assert!(paused_at.elapsed() < LEASE + Duration::from_secs(1), "no new leader while the old one is stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let version = nodes[third].get(&format!("/v1/services/{SERVICE}/endpoints")).await.unwrap()["version"].clone();
    tokio::time::sleep(LEASE).await;
    nodes[second].pause(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!nodes[second].leads().await, "woken after its lease, the old leader must not lead");
    assert!(nodes[third].leads().await);
    assert_eq!(leader(&nodes[..], Duration::from_secs(1)).await, third);
    // nothing changed while it was stopped and after it woke: both backends are as the new leader saw them
    assert_eq!(state(&nodes[second], "av-1").await.as_deref(), Some("healthy"));
    assert_eq!(state(&nodes[second], "av-2").await.as_deref(), Some("unhealthy"));
    let after = nodes[third].get(&format!("/v1/services/{SERVICE}/endpoints")).await.unwrap()["version"].clone();
    assert_eq!(version, after, "the woken node wrote nothing");
    nodes[first].restart().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_quorum_writes_get_a_503_and_everything_recovers_when_it_returns() {
    let mut etcd = Etcd::start(3).await.unwrap();
    let nodes = nodes(&etcd, 2).await;
    let (a, b) = (Backend::start("av-1").await.unwrap(), Backend::start("av-2").await.unwrap());
    assert_eq!(register(&nodes[0], &a).await, 201);
    // one member of three lost: everything works (once etcd has its leader: a second when the lost member led it)
    etcd.kill(2);
    etcd.wait_quorum(Duration::from_secs(5)).await.unwrap();
    assert_eq!(register(&nodes[1], &b).await, 201);
    let all: Vec<&Supervisor> = nodes.iter().collect();
    wait_state_everywhere(&all, "av-2", "healthy", Duration::from_secs(5)).await;
    // quorum lost: a write is refused with a clear error, never acknowledged; reads and tables still answer
    etcd.kill(1);
    let started = Instant::now();
    let (code, body) = nodes[1]
        .call("PUT", &format!("/v1/services/{SERVICE}/instances/av-1"), Some(json!({"weight": 5})))
        .await
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let table = nodes[0].get(&format!("/v1/services/{SERVICE}/endpoints")).await.unwrap();
    assert_eq!(table["endpoints"].as_array().unwrap().len(), 2, "the last table is still served");
    // etcd back: writes work again, with no one restarted
    etcd.restart(1).await.unwrap();
    etcd.restart(2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _) = nodes[1]
            .call("PUT", &format!("/v1/services/{SERVICE}/instances/av-1"), Some(json!({"weight": 5})))
            .await
            .unwrap();
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "writes did not come back: {code}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let weight =
        |v: serde_json::Value| v.as_array().unwrap().iter().find(|i| i["id"] == "av-1").unwrap()["weight"].clone();
    let deadline = Instant::now() + Duration::from_secs(2);
    while weight(nodes[0].get(&format!("/v1/services/{SERVICE}/instances")).await.unwrap()) != 5 {
        assert!(Instant::now() < deadline, "the write did not reach the other node");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    leader(&nodes, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_refuses_a_fenced_write_from_a_node_whose_leader_key_is_gone_and_a_stale_view() {
    let etcd = Etcd::start(1).await.unwrap();
    let config = EtcdConfig {
        endpoints: etcd.endpoints(),
        prefix: "/fence-test".into(),
        lease_ttl_ms: 2000,
        user: None,
        tls: None,
    };
    let leadership = Arc::new(Leadership::elected());
    let store = EtcdStore::connect(&config, "node-a", leadership.clone()).await.unwrap();
    let mut client = store.client();
    let leader_key = "/fence-test/leader";
    let created = client.put(leader_key, "me", None).await.unwrap().header().unwrap().revision();
    let mut registry =
        Registry { secret: Some(equilibrio_supervisor::secret::Secret::generate().unwrap()), ..Default::default() };
    let keys = [Key::Secret];
    let change = |fenced| Change { after: &registry, keys: &keys, eventful: true, fenced };

    // not leading: refused before etcd is asked
    assert!(matches!(store.commit(change(true)).await, Err(PersistError::NotLeader)));
    leadership.won(Fence { key: leader_key.into(), create_revision: created }, Instant::now() + Duration::from_secs(5));
    store.commit(change(true)).await.unwrap();
    // another node's view is stale: the same key written again without having seen this write is a conflict
    let other = EtcdStore::connect(&config, "node-b", Arc::new(Leadership::elected())).await.unwrap();
    assert!(matches!(other.commit(change(false)).await, Err(PersistError::Conflict)));
    // the leader key changes hands (another node's): this node's fenced writes are refused by etcd itself
    client.delete(leader_key, None).await.unwrap();
    client.put(leader_key, "someone else", None).await.unwrap();
    registry.secret = Some(equilibrio_supervisor::secret::Secret::generate().unwrap());
    let change = Change { after: &registry, keys: &keys, eventful: true, fenced: true };
    assert!(matches!(store.commit(change).await, Err(PersistError::NotLeader)));
    assert!(!leadership.is_leader(), "told by etcd, it stops leading at once");
    assert!(matches!(store.confirm_leadership().await, Err(PersistError::NotLeader)));
    // its lease time past, a node stops on its own, without asking etcd
    let leadership = Arc::new(Leadership::elected());
    leadership.won(Fence { key: leader_key.into(), create_revision: created }, Instant::now());
    assert!(!leadership.is_leader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_proxy_follows_the_nodes_that_are_up_and_loses_no_request_when_the_leader_dies() {
    let etcd = Etcd::start(1).await.unwrap();
    let mut nodes = nodes(&etcd, 2).await;
    let (a, b) = (Backend::start("av-1").await.unwrap(), Backend::start("av-2").await.unwrap());
    assert_eq!(register(&nodes[0], &a).await, 201);
    let all: Vec<&Supervisor> = nodes.iter().collect();
    wait_state_everywhere(&all, "av-1", "healthy", Duration::from_secs(5)).await;
    let filter = json!({"service": SERVICE, "supervisor": {"clusters": ["supervisor-0", "supervisor-1"],
        "authority": "supervisor", "poll_period": "200ms", "timeout": "150ms",
        "token": equilibrio_tests::supervisor::TOKEN}});
    let config = render_config_nodes(&filter, &[nodes[0].addr, nodes[1].addr]).unwrap();
    let proxy = Host::start_with(&config, 2).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/", proxy.listener);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "the proxy never served:\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // steady traffic (about 500 requests a second) for the rest of the test
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sent, failed) =
        (Arc::new(std::sync::atomic::AtomicUsize::new(0)), Arc::new(std::sync::atomic::AtomicUsize::new(0)));
    let traffic = {
        let (stop, sent, failed, client, url) =
            (stop.clone(), sent.clone(), failed.clone(), client.clone(), url.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut calls = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tick.tick().await;
                let (sent, failed, client, url) = (sent.clone(), failed.clone(), client.clone(), url.clone());
                calls.push(tokio::spawn(async move {
                    let ok = client.get(&url).send().await.is_ok_and(|r| r.status().is_success());
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if !ok {
                        failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }));
            }
            for c in calls {
                let _ = c.await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // the node the proxy asks first, and the leader (it started first), dies: the proxy moves to the other one,
    // which leads within the lease; a backend registered through it then gets traffic through the proxy
    assert_eq!(leader(&nodes, Duration::from_secs(5)).await, 0, "the first node started leads");
    nodes[0].kill9();
    leader(&nodes[1..], LEASE + Duration::from_secs(2)).await;
    assert_eq!(register(&nodes[1], &b).await, 201);
    nodes[1].wait_state(SERVICE, "av-2", "healthy", Duration::from_secs(5)).await.unwrap();
    let before = b.hits();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.hits() < before + 20 {
        assert!(Instant::now() < deadline, "the proxy did not follow the surviving node:\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    traffic.await.unwrap();
    let (sent, failed) =
        (sent.load(std::sync::atomic::Ordering::SeqCst), failed.load(std::sync::atomic::Ordering::SeqCst));
    assert!(sent > 500, "{sent} requests sent");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    assert!(proxy.log().contains("asking cluster `supervisor-1` next"), "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_adopts_the_running_containers_with_no_duplicate_and_no_removal() {
    docker_ready();
    let service = format!("av-ha-{}", std::process::id());
    let containers = Containers(service.clone());
    let etcd = Etcd::start(1).await.unwrap();
    let store = etcd.store_yaml("/eq-adopt", "2s");
    let yaml = format!(
        "environment: development\ndrain_timeout: 10\nservices:\n  {service}:\n    health_check: {{interval: 250ms, timeout: 200ms, retries: 2, rise: 1}}\n    docker: {{image: '{IMAGE}', port: 8080, cpus: 0.5, memory_mb: 64, stop_grace: 5}}\n    scaling: {{min_instances: 2, max_instances: 3, slow_start: 0}}\n"
    );
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Supervisor::start_node(&format!("node-{i}"), &store, &yaml).await.unwrap());
    }
    // the leader starts two containers, and only it: a follower starting its own would make four
    let started = Instant::now();
    let healthy =
        |v: serde_json::Value| v.as_array().map_or(0, |a| a.iter().filter(|i| i["state"] == "healthy").count());
    while healthy(nodes[1].get(&format!("/v1/services/{service}/instances")).await.unwrap()) < 2 {
        assert!(started.elapsed() < Duration::from_secs(30), "two instances never became healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut before = containers.ids(true);
    before.sort();
    assert_eq!(before.len(), 2, "{before:?}");
    // the leader dies: another node leads and adopts them (the deployment secret signs them, from etcd)
    let first = leader(&nodes, Duration::from_secs(5)).await;
    nodes[first].kill9();
    let rest: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    let killed = Instant::now();
    let other = wait_leading(&nodes, LEASE + Duration::from_secs(1)).await.expect("no new leader");
    assert!(killed.elapsed() < LEASE + Duration::from_secs(1), "no new leader");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut after = containers.ids(true);
    after.sort();
    assert_eq!(after, before, "the same containers: none started, none removed");
    assert_eq!(healthy(nodes[other].get(&format!("/v1/services/{service}/instances")).await.unwrap()), 2);
    let events = nodes[other].get(&format!("/v1/services/{service}/scaling/events")).await.unwrap();
    assert!(
        !events.as_array().unwrap().iter().any(|e| e["kind"] == "scale_up" || e["kind"] == "scale_down"),
        "{events}"
    );
    // the new leader stalls (SIGSTOP) past its lease: the third node leads; woken, the stalled one touches no
    // container (Docker's events) and writes nothing (the table version)
    let third = rest.into_iter().find(|&i| i != other).unwrap();
    nodes[other].pause(true);
    let paused = Instant::now();
    while !nodes[third].leads().await {
        assert!(paused.elapsed() < LEASE + Duration::from_secs(1), "no new leader while the old one is stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let version = nodes[third].get(&format!("/v1/services/{service}/endpoints")).await.unwrap()["version"].clone();
    let woken = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    nodes[other].pause(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!nodes[other].leads().await);
    let docker_events = std::process::Command::new("docker")
        .args(["events", "--since", &woken.to_string(), "--until", "0s", "--filter"])
        .arg(format!("label=io.equilibrio.service={service}"))
        .output()
        .unwrap();
    let docker_events = String::from_utf8_lossy(&docker_events.stdout).to_string();
    assert!(docker_events.trim().is_empty(), "container actions after the stalled leader woke: {docker_events}");
    let mut now = containers.ids(true);
    now.sort();
    assert_eq!(now, before);
    let after = nodes[third].get(&format!("/v1/services/{service}/endpoints")).await.unwrap()["version"].clone();
    assert_eq!(version, after, "nothing written after it woke");
}

/// A CA, and two certificates it signed (for 127.0.0.1, server and client use) written as PEM files in `dir`: the
/// CA, etcd's pair and the supervisor's pair.
fn tls_files(dir: &std::path::Path) -> (equilibrio_tests::etcd::Tls, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "equilibrio etcd test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |name: &str| {
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("equilibrio-supervisor");
    let tls = equilibrio_tests::etcd::Tls {
        ca: write("ca.pem", &ca_cert.pem()),
        cert: write("etcd.pem", &server_cert),
        key: write("etcd-key.pem", &server_key),
    };
    (tls, write("supervisor.pem", &client_cert), write("supervisor-key.pem", &client_key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisors_speak_tls_to_etcd_with_a_client_certificate() {
    let dir = equilibrio_tests::work_dir("etcd-tls").unwrap();
    let (tls, cert, key) = tls_files(&dir);
    let etcd = Etcd::start_with(1, Some(tls.clone())).await.unwrap();
    let endpoints = etcd.endpoints().iter().map(|e| format!("'{e}'")).collect::<Vec<_>>().join(", ");
    assert!(endpoints.contains("https://"));
    let store = |with_cert: bool| {
        let client = if with_cert {
            format!(", cert_file: '{}', key_file: '{}'", cert.display(), key.display())
        } else {
            String::new()
        };
        format!(
            "store: {{kind: etcd, endpoints: [{endpoints}], prefix: /eq-tls, lease_ttl: 2s, ca_file: '{}'{client}}}\n",
            tls.ca.display()
        )
    };
    let nodes = [
        Supervisor::start_node("node-0", &store(true), &service_yaml()).await.unwrap(),
        Supervisor::start_node("node-1", &store(true), &service_yaml()).await.unwrap(),
    ];
    let backend = Backend::start("av-1").await.unwrap();
    assert_eq!(register(&nodes[0], &backend).await, 201);
    wait_state_everywhere(&nodes.iter().collect::<Vec<_>>(), "av-1", "healthy", Duration::from_secs(5)).await;
    leader(&nodes, Duration::from_secs(5)).await;
    // without a client certificate etcd refuses the connection: the node does not start on a registry it cannot read
    let refused = Supervisor::start_node("node-2", &store(false), &service_yaml()).await;
    let Err(e) = refused else { panic!("a node without a client certificate started") };
    assert!(e.to_string().contains("registry store is unavailable"), "{e}");
}
