//! The autoscaler with a real Docker Swarm of three nodes (`scripts/swarm-lab`: three dockerds in their own network
//! namespaces, `equilibrio_tests::swarm`) and the bundled proxy: a service in `mode: swarm` scaled up under load over
//! several nodes and back down without a failed request (tasks drained before Swarm removes them), a killed task and
//! a stopped node's tasks replaced by Swarm and followed by the table, a replica count changed by hand reconciled with
//! an event, a restarted supervisor adopting the service as it is.

// test code: a failed unwrap is a failed test
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use equilibrio_tests::containers::IMAGE;
use equilibrio_tests::host::Host;
use equilibrio_tests::supervisor::{QUICK_SCALING, Supervisor, TOKEN};
use equilibrio_tests::swarm::{LAB_MANAGER, SwarmService, stop_node, swarm_ready};
use serde_json::{Value, json};

fn service_name(test: &str) -> String {
    format!("av-swarm-{test}-{}", std::process::id())
}

/// Node 1 is the manager the supervisor talks to; the other nodes' APIs give their tasks' CPU and memory.
fn yaml(service: &str, scaling: &str) -> String {
    yaml_with(service, scaling, "")
}

/// [`yaml`] with more keys in the service's `docker` template.
fn yaml_with(service: &str, scaling: &str, docker: &str) -> String {
    format!(
        "environment: development\ndrain_timeout: 10\nservices:\n  {service}:\n    health_check: {{interval: 250ms, timeout: 200ms, retries: 2, rise: 1}}\n    docker: {{mode: swarm, image: '{IMAGE}', port: 8080, env: ['CPU_COST_MS=20'], cpus: 0.5, memory_mb: 64, stop_grace: 5, node_apis: {{eqlab-n2: 'tcp://10.77.0.12:2375', eqlab-n3: 'tcp://10.77.0.13:2375'}}{docker}}}\n    scaling: {scaling}\n"
    )
}

/// What clients sending GETs through a proxy saw: answered 200, anything else, and the instances that answered.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    ok: AtomicUsize,
    failed: AtomicUsize,
    served: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// What each failed request got (seconds since the load started, status or error), printed when a test fails.
    failures: std::sync::Mutex<Vec<String>>,
}

/// `n` clients, each sending a GET through `proxy` every `pause` until the load is stopped.
fn clients(proxy: &Host, n: usize, pause: Duration) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
    let load = Arc::new(Load::default());
    let started = Instant::now();
    let tasks = (0..n)
        .map(|_| {
            let (load, url) = (load.clone(), format!("http://{}/search?q=zapatos", proxy.listener));
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !load.stop.load(Ordering::SeqCst) {
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            load.ok.fetch_add(1, Ordering::SeqCst);
                            let body: Value = r.json().await.unwrap_or_default();
                            if let Some(id) = body["instance"].as_str() {
                                load.served.lock().unwrap().insert(id.to_string());
                            }
                        }
                        other => {
                            load.failed.fetch_add(1, Ordering::SeqCst);
                            let what = match other {
                                Ok(r) => format!("status {}: {}", r.status(), r.text().await.unwrap_or_default()),
                                Err(e) => format!("error {e:?}"),
                            };
                            let at = started.elapsed().as_secs_f64();
                            load.failures.lock().unwrap().push(format!("{at:.2}s {what}"));
                        }
                    }
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect();
    (load, tasks)
}

/// Waits until every one of `instances` has answered one of the load's requests (the proxy has it in its table).
async fn wait_served(load: &Load, instances: &[String]) {
    let start = Instant::now();
    while !instances.iter().all(|id| load.served.lock().unwrap().contains(id)) {
        let served = load.served.lock().unwrap().clone();
        assert!(start.elapsed() < Duration::from_secs(15), "not every task served: {instances:?} {served:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The supervisor on the lab's manager, logging (at debug) each task whose CPU and memory it could not read.
async fn supervisor(yaml: &str) -> Supervisor {
    let env =
        [("DOCKER_HOST", LAB_MANAGER), ("EQUILIBRIO_LOG", "info,equilibrio_supervisor::scaling::controller=debug")];
    Supervisor::start_with_env(yaml, &env).await.unwrap()
}

fn ids(list: &[Value]) -> Vec<String> {
    list.iter().filter_map(|i| i["id"].as_str().map(String::from)).collect()
}

async fn instances(s: &Supervisor, service: &str) -> Vec<Value> {
    let v = s.get(&format!("/v1/services/{service}/instances")).await.unwrap();
    v.as_array().cloned().unwrap_or_default()
}

async fn healthy(s: &Supervisor, service: &str) -> usize {
    instances(s, service).await.iter().filter(|i| i["state"] == "healthy").count()
}

async fn wait_until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_service_scales_with_load_through_the_bundled_proxy_without_a_failed_request() {
    swarm_ready();
    let service = service_name("load");
    let swarm = SwarmService(service.clone());
    let scaling = QUICK_SCALING;
    let s = supervisor(&yaml(&service, scaling)).await;
    // the supervisor creates the Swarm service with the minimum; its task becomes an instance in its node's zone
    wait_until("one healthy task", Duration::from_secs(40), async || healthy(&s, &service).await == 1).await;
    assert_eq!(swarm.replicas(), Some(1));
    let first = instances(&s, &service).await.remove(0);
    let node = &swarm.running()[0].1;
    assert_eq!(first["zone"].as_str(), node.strip_prefix("eqlab-n").map(|i| format!("zone-{i}")).as_deref(), "{first}");
    assert!(first["address"].as_str().unwrap().starts_with("10.77.0."), "{first}");
    assert!(first["id"].as_str().unwrap().starts_with(&format!("{service}.1.")), "{first}");
    let filter = json!({"service": service, "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let proxy = Host::start(&filter, s.addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (load, clients) = clients(&proxy, 6, Duration::ZERO);
    let start = Instant::now();
    while swarm.replicas() < Some(3) {
        if start.elapsed() > Duration::from_secs(60) {
            let view = s.get(&format!("/v1/services/{service}/scaling")).await.unwrap();
            let events = s.get(&format!("/v1/services/{service}/scaling/events")).await.unwrap();
            panic!("replicas did not reach 3: {view}\n{events}\n{}", s.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up = start.elapsed();
    let start = Instant::now();
    while healthy(&s, &service).await < 3 {
        if start.elapsed() > Duration::from_secs(40) {
            let tasks = Command::new("docker")
                .args(["-H", LAB_MANAGER, "service", "ps", "--no-trunc", &service])
                .output()
                .unwrap();
            panic!(
                "3 replicas, not 3 healthy tasks: {:?}\n{}\n{}",
                instances(&s, &service).await,
                String::from_utf8_lossy(&tasks.stdout),
                s.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Swarm placed them on more than one node, and each one serves once healthy
    let nodes: std::collections::BTreeSet<String> = swarm.running().into_iter().map(|(_, node, _)| node).collect();
    assert!(nodes.len() >= 2, "3 tasks on one node: {nodes:?}");
    wait_served(&load, &ids(&instances(&s, &service).await)).await;
    // a few rounds with the three serving: every task's CPU and memory were read, on its own node
    tokio::time::sleep(Duration::from_secs(3)).await;
    let unread = s.log().lines().filter(|l| l.contains("no CPU and memory figure")).count();
    assert_eq!(unread, 0, "CPU not read for some tasks:\n{}", s.log());
    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // back down to the minimum after the load, each removed task drained first
    let down = wait_until("replicas back to 1", Duration::from_secs(120), async || swarm.replicas() == Some(1)).await;
    wait_until("one task left", Duration::from_secs(30), async || swarm.running().len() == 1).await;
    let (ok, failed) = (load.ok.load(Ordering::SeqCst), load.failed.load(Ordering::SeqCst));
    eprintln!(
        "swarm: replicas to 3 in {up:?} (nodes {nodes:?}), back to 1 in {down:?}; {ok} requests, {failed} failed"
    );
    let events = s.get(&format!("/v1/services/{service}/scaling/events")).await.unwrap();
    let kinds: Vec<&str> = events.as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"scale_up") && kinds.contains(&"scale_down"), "{events}");
    assert!(ok > 100);
    let failures = load.failures.lock().unwrap().clone();
    assert_eq!(failed, 0, "no failed request while Swarm scaled: {failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_changes_are_followed_a_killed_task_a_stopped_node_a_hand_scale_and_a_restart() {
    swarm_ready();
    let service = service_name("follow");
    let swarm = SwarmService(service.clone());
    // spread over the zones (one per node): the two tasks never share a node
    let spread = ", placement: {spread: [node.labels.io.equilibrio.zone]}";
    let mut s = supervisor(&yaml_with(&service, "{min_instances: 2, max_instances: 3}", spread)).await;
    wait_until("two healthy tasks", Duration::from_secs(40), async || healthy(&s, &service).await == 2).await;
    let filter = json!({"service": service, "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let proxy = Host::start(&filter, s.addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // steady traffic through the failures below: the retry policy must save every request
    let (load, clients) = clients(&proxy, 4, Duration::from_millis(20));
    let load_started = Instant::now();

    // a task killed on its node: Swarm replaces it; the table drops the dead one and takes in the new one
    let (dead_task, node, container) = swarm.running()[0].clone();
    let socket = format!("unix:///run/eqlab/{}.sock", node.trim_start_matches("eqlab-"));
    eprintln!("{:.2}s: killing task {dead_task} on {node}", load_started.elapsed().as_secs_f64());
    Command::new("docker").args(["-H", &socket, "kill", &container]).output().unwrap();
    let followed = wait_until("the table follows the replacement", Duration::from_secs(40), async || {
        let list = instances(&s, &service).await;
        let healthy = list.iter().filter(|i| i["state"] == "healthy").count();
        list.len() == 2 && healthy == 2 && !ids(&list).iter().any(|id| id.ends_with(&dead_task))
    })
    .await;
    eprintln!("killed task replaced and in the table within {followed:?}");
    // the proxy polls the table: until it has the replacement, the task on the node stopped below is its only one
    wait_served(&load, &ids(&instances(&s, &service).await)).await;

    // a node's daemon stops (its task with it): its endpoint leaves the table (health checks), and Swarm runs the
    // task elsewhere once it has declared the node down
    let on: Vec<String> = swarm.running().into_iter().map(|(_, node, _)| node).collect();
    let victim = on.iter().find(|n| *n != "eqlab-n1").cloned().unwrap_or_else(|| "eqlab-n2".into());
    let index: u32 = victim.trim_start_matches("eqlab-n").parse().unwrap();
    eprintln!("{:.2}s: stopping {victim}; tasks on {on:?}", load_started.elapsed().as_secs_f64());
    stop_node(index);
    let moved = wait_until("tasks moved off the stopped node, in the table", Duration::from_secs(90), async || {
        let list = instances(&s, &service).await;
        let healthy = list.iter().filter(|i| i["state"] == "healthy").count();
        let zone = format!("zone-{index}");
        healthy == 2 && list.iter().filter(|i| i["state"] == "healthy").all(|i| i["zone"] != zone.as_str())
    })
    .await;
    eprintln!("node {victim} stopped: its task replaced elsewhere and in the table within {moved:?}");
    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (load.ok.load(Ordering::SeqCst), load.failed.load(Ordering::SeqCst));
    eprintln!("through both failures: {ok} requests answered, {failed} failed");
    assert!(ok > 100, "{ok} requests");
    let failures = load.failures.lock().unwrap().clone();
    assert_eq!(failed, 0, "the retry policy saves every request of a killed task or a stopped node: {failures:#?}");
    swarm_ready(); // the node comes back

    // scaled by hand above the maximum: set back to it, with an event (the steady traffic may have scaled it up)
    let before = swarm.replicas().map(u64::from);
    swarm.scale_by_hand(5);
    wait_until("replicas held to max_instances", Duration::from_secs(20), async || swarm.replicas() == Some(3)).await;
    let events = s.get(&format!("/v1/services/{service}/scaling/events")).await.unwrap();
    let changed = events.as_array().unwrap().iter().find(|e| e["kind"] == "changed_outside");
    let changed = changed.unwrap_or_else(|| panic!("no changed_outside event: {events}"));
    assert_eq!((changed["from"].as_u64(), changed["to"].as_u64()), (before, Some(5)));

    // within bounds: adopted as it is; a restarted supervisor adopts it too (no replica change on start)
    swarm.scale_by_hand(2);
    wait_until("two healthy tasks", Duration::from_secs(40), async || healthy(&s, &service).await == 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(swarm.replicas(), Some(2), "a count within bounds is adopted");
    s.kill9();
    s.restart().await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(swarm.replicas(), Some(2), "no replica change on start");
    wait_until("adopted tasks serving", Duration::from_secs(20), async || healthy(&s, &service).await == 2).await;

    // a manual scale through our API wins over a change by hand for its hold time
    let (st, _) = s
        .call("POST", &format!("/v1/services/{service}/scale"), Some(json!({"instances": 3, "hold": "5m"})))
        .await
        .unwrap();
    assert_eq!(st, 200);
    wait_until("the manual scale", Duration::from_secs(20), async || swarm.replicas() == Some(3)).await;
    swarm.scale_by_hand(2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_until("the manual scale holds", Duration::from_secs(20), async || swarm.replicas() == Some(3)).await;
}
