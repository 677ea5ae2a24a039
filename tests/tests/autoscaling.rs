//! The autoscaler with the real dockerd (started by `scripts/docker-up`) and the demo image (built by
//! `scripts/build-demo-image`): scaling up under load and back down without a failed request, a killed container
//! replaced, a restarted supervisor adopting what runs, min and max holding.

// test code: a failed unwrap is a failed test
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use equilibrio_tests::containers::{Containers, IMAGE, docker_ready};
use equilibrio_tests::envoy::Envoy;
use equilibrio_tests::supervisor::{QUICK_SCALING, Supervisor, TOKEN};
use serde_json::json;

fn service_name(test: &str) -> String {
    format!("av-{test}-{}", std::process::id())
}

fn yaml(service: &str, scaling: &str) -> String {
    format!(
        "environment: development\ndrain_timeout: 10\nservices:\n  {service}:\n    health_check: {{interval: 250ms, timeout: 200ms, retries: 2, rise: 1}}\n    docker: {{image: '{IMAGE}', port: 8080, env: ['CPU_COST_MS=20'], cpus: 0.5, memory_mb: 64, stop_grace: 5}}\n    scaling: {scaling}\n"
    )
}

async fn wait_running(c: &Containers, n: usize, within: Duration) -> Duration {
    let start = Instant::now();
    while c.ids(true).len() != n {
        assert!(start.elapsed() < within, "{} containers running, want {n}", c.ids(true).len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    start.elapsed()
}

async fn healthy(s: &Supervisor, service: &str) -> usize {
    let v = s.get(&format!("/v1/services/{service}/instances")).await.unwrap();
    v.as_array().map_or(0, |a| a.iter().filter(|i| i["state"] == "healthy").count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_up_under_load_and_back_down_without_failing_a_request() {
    docker_ready();
    let service = service_name("load");
    let containers = Containers(service.clone());
    // CPU and request rate (from the filter's reports; on two cores the CPU of the containers competes with Envoy and
    // the load generator), short windows so the test takes a minute, not the plan's minutes
    let scaling = QUICK_SCALING;
    let s = Supervisor::start(&yaml(&service, scaling)).await.unwrap();
    wait_running(&containers, 1, Duration::from_secs(20)).await;
    let start = Instant::now();
    while healthy(&s, &service).await < 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "the first instance never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let filter = json!({"service": service, "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let envoy = Envoy::start(&filter, s.addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // steady load: 6 clients, each request 20 ms of CPU on containers limited to half a core
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), envoy.url("/search?q=zapatos"));
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    let start = Instant::now();
    while containers.ids(true).len() < 3 {
        if start.elapsed() > Duration::from_secs(45) {
            let view = s.get(&format!("/v1/services/{service}/scaling")).await.unwrap();
            let events = s.get(&format!("/v1/services/{service}/scaling/events")).await.unwrap();
            panic!("did not reach 3 instances: {view}\n{events}\n{}", s.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up = start.elapsed();
    let start = Instant::now();
    while healthy(&s, &service).await < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "new instances never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // back down to the minimum after the load, through drains
    let down = wait_running(&containers, 1, Duration::from_secs(90)).await;
    let events = s.get(&format!("/v1/services/{service}/scaling/events")).await.unwrap();
    let kinds: Vec<&str> = events.as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"scale_up") && kinds.contains(&"scale_down"), "{events}");
    let up_event =
        events.as_array().unwrap().iter().find(|e| e["kind"] == "scale_up" && e["from"].as_u64() >= Some(1)).unwrap();
    let reason = up_event["reason"].as_str().unwrap();
    assert!(reason.contains("cpu_utilization") || reason.contains("request_rate"), "{up_event}");
    let failed = failed.load(Ordering::SeqCst);
    let ok = ok.load(Ordering::SeqCst);
    eprintln!("scale-up to 3 in {up:?}, down to 1 in {down:?}; {ok} requests, {failed} failed");
    assert!(ok > 100);
    assert_eq!(failed, 0, "no failed request while scaling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_container_is_replaced_and_a_restart_adopts_without_duplicates() {
    docker_ready();
    let service = service_name("replace");
    let containers = Containers(service.clone());
    let mut s = Supervisor::start(&yaml(&service, "{min_instances: 2, max_instances: 3}")).await.unwrap();
    wait_running(&containers, 2, Duration::from_secs(20)).await;
    let before = containers.ids(true);
    // killed: replaced
    Command::new("docker").args(["kill", &before[0]]).output().unwrap();
    let start = Instant::now();
    loop {
        let now = containers.ids(true);
        if now.len() == 2 && !now.contains(&before[0]) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "not replaced: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = s.get(&format!("/v1/services/{service}/scaling/events")).await.unwrap();
    assert!(events.as_array().unwrap().iter().any(|e| e["kind"] == "replaced"), "{events}");
    // kill -9 the supervisor, start it again: it adopts the two containers, starts none
    let running = containers.ids(true);
    s.kill9();
    s.restart().await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut after = containers.ids(true);
    let mut expected = running.clone();
    after.sort();
    expected.sort();
    assert_eq!(after, expected, "same containers, no duplicates, no orphans");
    let start = Instant::now();
    while healthy(&s, &service).await < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "adopted instances are not serving");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // min and max hold for a manual scale too
    let (st, e) =
        s.call("POST", &format!("/v1/services/{service}/scale"), Some(json!({"instances": 9}))).await.unwrap();
    assert_eq!((st, e["error"]["field"].as_str()), (422, Some("instances")));
    let (st, _) = s
        .call("POST", &format!("/v1/services/{service}/scale"), Some(json!({"instances": 3, "hold": "1m"})))
        .await
        .unwrap();
    assert_eq!(st, 200);
    wait_running(&containers, 3, Duration::from_secs(20)).await;
    // the scaling policy is readable and changeable at runtime, validated
    let (st, e) =
        s.call("PUT", &format!("/v1/services/{service}/scaling"), Some(json!({"max_instances": 0}))).await.unwrap();
    assert_eq!((st, e["error"]["field"].as_str()), (422, Some("max_instances")));
    let (st, v) = s
        .call("PUT", &format!("/v1/services/{service}/scaling"), Some(json!({"scale_down_stabilization": 60})))
        .await
        .unwrap();
    assert_eq!((st, v["policy"]["scale_down_stabilization"].as_f64()), (200, Some(60.0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_a_failed_scaling_event_and_user_containers_are_served_only_when_opted_in() {
    docker_ready();
    let service = service_name("faults");
    let containers = Containers(service.clone());
    // containers someone starts by hand with the service label: one plain, one with every label the autoscaler
    // writes forged (managed-by, an instance id, a port, a made-up signature)
    let by_hand = |name: &str, labels: &[String]| {
        let mut args: Vec<String> = vec!["run".into(), "-d".into()];
        for l in labels {
            args.extend(["--label".into(), l.clone()]);
        }
        args.extend([
            "-p".into(),
            "127.0.0.1::8080".into(),
            "--name".into(),
            format!("{service}-{name}"),
            IMAGE.into(),
        ]);
        let out = Command::new("docker").args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    by_hand("plain", &[format!("io.equilibrio.service={service}")]);
    by_hand(
        "forged",
        &[
            format!("io.equilibrio.service={service}"),
            "io.equilibrio.managed-by=equilibrio".into(),
            "io.equilibrio.instance=i-1".into(),
            "io.equilibrio.port=9".into(),
            format!("io.equilibrio.signature={}", "ab".repeat(32)),
        ],
    );
    let yaml = yaml(&service, "{min_instances: 2, max_instances: 4}").replace(IMAGE, "equilibrio/does-not-exist:1");
    let mut s = Supervisor::start(&yaml).await.unwrap();
    let start = Instant::now();
    loop {
        let events = s.get(&format!("/v1/services/{service}/scaling/events")).await.unwrap();
        let failed = events.as_array().unwrap().iter().find(|e| e["kind"] == "failed").cloned();
        if let Some(f) = failed {
            let reason = f["reason"].as_str().unwrap();
            assert!(reason.contains("No such image") || reason.contains("not found"), "Docker's message: {reason}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "no failed-scaling event: {events}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // by default neither is served nor counted (the autoscaler keeps trying to start its own two)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = s.get(&format!("/v1/services/{service}/instances")).await.unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(0), "unsigned containers were adopted: {v}");
    assert!(s.log().contains("no valid signature"), "the operator is told why:\n{}", s.log());
    assert_eq!(containers.ids(true).len(), 2, "and they are left alone");

    // opted in: served under their container names at the template's port, the forged labels not believed
    s.kill9();
    let opted_in = yaml.replace("stop_grace: 5", "stop_grace: 5, adopt_unsigned: true");
    let s = Supervisor::start(&opted_in).await.unwrap();
    let start = Instant::now();
    while healthy(&s, &service).await < 2 {
        assert!(start.elapsed() < Duration::from_secs(15), "the user's containers were not discovered\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = s.get(&format!("/v1/services/{service}/instances")).await.unwrap();
    let mut ids: Vec<&str> = v.as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, [format!("{service}-forged"), format!("{service}-plain")]);
    assert!(v.as_array().unwrap().iter().all(|i| i["source"] == "docker"));
    assert_eq!(containers.ids(true).len(), 2, "still running, never stopped by us, and nothing else could start");
}

async fn scaling_events(s: &Supervisor, service: &str) -> Vec<serde_json::Value> {
    s.get(&format!("/v1/services/{service}/scaling/events")).await.unwrap().as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_the_start_timeout_adopts_everything_and_only_what_stays_unhealthy_is_replaced() {
    docker_ready();
    let service = service_name("adopt");
    let containers = Containers(service.clone());
    // rise 2 (the production and staging profiles'); start timeout and replacement time of 3 s, so that a restart
    // 5 s later is "long after the start" and the test stays short
    let yaml = yaml(
        &service,
        // max_unhealthy_share 1: the overload guard is off, so only the start grace protects the adopted containers
        "{min_instances: 3, max_instances: 3, start_timeout: 3, replace_unhealthy_after: 3, max_unhealthy_share: 1}",
    )
    .replace("rise: 1", "rise: 2");
    let mut s = Supervisor::start(&yaml).await.unwrap();
    wait_running(&containers, 3, Duration::from_secs(30)).await;
    let start = Instant::now();
    while healthy(&s, &service).await < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "never all healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut before = containers.ids(true);
    before.sort();

    // kill -9, restart after more than the start timeout: every container is adopted, none removed
    s.kill9();
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.restart().await.unwrap();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(6) {
        let mut now = containers.ids(true);
        now.sort();
        assert_eq!(now, before, "a container was removed or added after the restart\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(healthy(&s, &service).await, 3, "adopted and serving");
    assert!(!scaling_events(&s, &service).await.iter().any(|e| e["kind"] == "replaced"));

    // one container stops answering (paused): replaced after replace_unhealthy_after, through a drain
    let paused = before[0].clone();
    Command::new("docker").args(["pause", &paused]).output().unwrap();
    let start = Instant::now();
    loop {
        let now = containers.ids(true);
        if now.len() == 3 && !now.contains(&paused) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(40), "not replaced: {now:?}\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(start.elapsed() >= Duration::from_secs(3), "replaced before replace_unhealthy_after");
    let replaced: Vec<_> = scaling_events(&s, &service).await.into_iter().filter(|e| e["kind"] == "replaced").collect();
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    let events = s.event_history(&service).await;
    assert!(events.contains("\"draining\""), "the replaced instance was drained first: {events}");

    // two of three stop answering at once: that is not the containers, nothing is replaced, an event says so
    let start = Instant::now();
    while healthy(&s, &service).await < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "the replacement never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, v) = s
        .call("PUT", &format!("/v1/services/{service}/scaling"), Some(json!({"max_unhealthy_share": 0.5})))
        .await
        .unwrap();
    assert_eq!(st, 200, "{v}");
    let both = [before[1].clone(), before[2].clone()];
    for id in &both {
        Command::new("docker").args(["pause", id]).output().unwrap();
    }
    let start = Instant::now();
    loop {
        let ev = scaling_events(&s, &service).await;
        if ev.iter().any(|e| e["kind"] == "replacements_held") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no replacements_held event: {ev:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = containers.ids(true);
    assert!(both.iter().all(|id| now.contains(id)) && now.len() == 3, "{now:?}");
    let replaced = scaling_events(&s, &service).await.into_iter().filter(|e| e["kind"] == "replaced").count();
    assert_eq!(replaced, 1, "nothing more was replaced");
    for id in &both {
        Command::new("docker").args(["unpause", id]).output().unwrap();
    }
    let start = Instant::now();
    while healthy(&s, &service).await < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "did not recover after the pause");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    loop {
        let events = s.event_history(&service).await;
        if events.contains("replacements_held") && events.contains("replacements_resumed") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{events}");
    }
    let now = containers.ids(true);
    assert!(both.iter().all(|id| now.contains(id)) && now.len() == 3, "both kept after the episode: {now:?}");
}

/// Only this metric weighs in the decision (the others at weight 0), with short windows.
fn one_metric(metric: &str, up: f64, down: f64, extra: &str) -> String {
    let m = |name: &str| {
        if name == metric {
            format!(
                "{name}: {{weight: 1, scale_up_threshold: {up}, scale_down_threshold: {down}, measurement_window: 8}}"
            )
        } else {
            format!("{name}: {{weight: 0, measurement_window: 8}}")
        }
    };
    format!(
        "{{min_instances: 1, max_instances: 2, scale_up_cooldown: 3, slow_start: 0{extra}, {}, {}, {}, {}}}",
        m("cpu_utilization"),
        m("memory_utilization"),
        m("request_rate"),
        m("response_time")
    )
}

async fn wait_scale_up_reason(s: &Supervisor, service: &str, containers: &Containers, metric: &str) {
    let start = Instant::now();
    loop {
        let events = scaling_events(s, service).await;
        let up = events.iter().find(|e| e["kind"] == "scale_up" && e["from"].as_u64() >= Some(1));
        if let Some(up) = up {
            let reason = up["reason"].as_str().unwrap_or_default();
            assert!(reason.contains(metric), "scaled up on something else: {up}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no scale-up on {metric}: {events:?}\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_running(containers, 2, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alone_scales_up() {
    docker_ready();
    let service = service_name("memory");
    let containers = Containers(service.clone());
    // each instance holds 40 MB of its 64 MB limit: above the 50% threshold with no traffic at all
    let scaling = one_metric("memory_utilization", 50.0, 10.0, ", target_memory_percent: 50");
    let yaml = yaml(&service, &scaling).replace("env: ['CPU_COST_MS=20']", "env: ['BALLAST_MB=40']");
    let s = Supervisor::start(&yaml).await.unwrap();
    wait_running(&containers, 1, Duration::from_secs(20)).await;
    wait_scale_up_reason(&s, &service, &containers, "memory_utilization").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p95_alone_scales_up_through_the_bundled_proxy() {
    use equilibrio_tests::proxy::{Kind, Proxy};
    docker_ready();
    let service = service_name("p95");
    let containers = Containers(service.clone());
    // every request waits 300 ms on a "slow dependency" and uses almost no CPU: only the p95 the bundled proxy
    // reports (above 200 ms) can ask for more instances
    let scaling = one_metric("response_time", 200.0, 50.0, "");
    let yaml = yaml(&service, &scaling).replace("env: ['CPU_COST_MS=20']", "env: ['CPU_COST_MS=0', 'DELAY_MS=300']");
    let s = Supervisor::start(&yaml).await.unwrap();
    wait_running(&containers, 1, Duration::from_secs(20)).await;
    while healthy(&s, &service).await < 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let filter = json!({"service": service, "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let proxy = Proxy::start(Kind::Host, &filter, s.addr).await.unwrap();
    let version = s.get(&format!("/v1/services/{service}/endpoints")).await.unwrap()["version"].as_u64().unwrap();
    proxy.wait_for_table(1, version).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, failed, url) = (stop.clone(), failed.clone(), proxy.url("/search?q=slow"));
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                if !client.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    wait_scale_up_reason(&s, &service, &containers, "response_time").await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_shows_in_the_traffic_shares() {
    use equilibrio_tests::proxy::{Kind, Proxy};
    docker_ready();
    let service = service_name("slowstart");
    let containers = Containers(service.clone());
    // 8 s of slow start: a new instance begins at 10% of its weight and reaches it linearly
    let yaml = yaml(&service, "{min_instances: 1, max_instances: 2, slow_start: 8}")
        .replace("env: ['CPU_COST_MS=20']", "env: ['CPU_COST_MS=0']");
    let s = Supervisor::start(&yaml).await.unwrap();
    wait_running(&containers, 1, Duration::from_secs(20)).await;
    while healthy(&s, &service).await < 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let filter = json!({"service": service, "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "250ms", "token": TOKEN}});
    let proxy = Proxy::start(Kind::Host, &filter, s.addr).await.unwrap();
    let version = s.get(&format!("/v1/services/{service}/endpoints")).await.unwrap()["version"].as_u64().unwrap();
    proxy.wait_for_table(1, version).await.unwrap();
    let client = reqwest::Client::new();
    let first = client.get(proxy.url("/search")).send().await.unwrap().json::<serde_json::Value>().await.unwrap();
    let old = first["instance"].as_str().unwrap().to_string();
    // the first instance had its own slow start: wait until it is at full weight
    let start = Instant::now();
    while s.get(&format!("/v1/services/{service}/endpoints")).await.unwrap()["endpoints"][0]["weight"] != 100 {
        assert!(start.elapsed() < Duration::from_secs(20), "the first instance never reached its full weight");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, _) = s
        .call("POST", &format!("/v1/services/{service}/scale"), Some(json!({"instances": 2, "hold": "5m"})))
        .await
        .unwrap();
    assert_eq!(st, 200);
    // traffic in windows of 100 requests: the new instance's share from the moment it appears
    let mut shares = Vec::new();
    let start = Instant::now();
    let mut seen_at = None;
    while seen_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(12)) {
        assert!(start.elapsed() < Duration::from_secs(60), "the new instance never got traffic");
        let mut new = 0;
        for _ in 0..100 {
            let v: serde_json::Value = client.get(proxy.url("/search")).send().await.unwrap().json().await.unwrap();
            if v["instance"] != old.as_str() {
                new += 1;
            }
        }
        if new > 0 && seen_at.is_none() {
            seen_at = Some(Instant::now());
        }
        if let Some(t) = seen_at {
            shares.push((t.elapsed().as_secs_f64(), new));
        }
    }
    eprintln!("new instance's share per 100 requests, by seconds since it appeared: {shares:?}");
    // the first two seconds: a trickle (10-25% of its weight: 9-20% of the traffic), not its half
    let early: Vec<usize> = shares.iter().filter(|(t, _)| *t < 2.0).map(|(_, n)| *n).collect();
    assert!(!early.is_empty() && early.iter().all(|n| *n <= 30), "no slow start: {shares:?}");
    // after the ramp: about half
    let late: Vec<usize> = shares.iter().filter(|(t, _)| *t > 10.0).map(|(_, n)| *n).collect();
    assert!(!late.is_empty() && late.iter().all(|n| (35..=65).contains(n)), "not at full weight: {shares:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_stopped_and_restarted_under_the_supervisor() {
    docker_ready();
    let service = service_name("dockerd");
    let containers = Containers(service.clone());
    let s = Supervisor::start(&yaml(&service, "{min_instances: 2, max_instances: 3}")).await.unwrap();
    wait_running(&containers, 2, Duration::from_secs(20)).await;
    while healthy(&s, &service).await < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let table = s.get(&format!("/v1/services/{service}/endpoints")).await.unwrap();
    let ready = || async { reqwest::get(s.url("/readyz")).await.map(|r| r.status().as_u16()).unwrap_or(0) };
    assert_eq!(ready().await, 200);

    // dockerd goes away (SIGTERM, as a package upgrade or a host restart does)
    let pid = std::fs::read_to_string("/var/run/docker.pid").unwrap().trim().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| !st.contains(") Z "))
    {
        assert!(start.elapsed() < Duration::from_secs(30), "dockerd did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    while ready().await != 503 {
        assert!(start.elapsed() < Duration::from_secs(10), "/readyz still answers while Docker is unreachable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the proxies keep their table: the same instances, nothing deregistered for want of Docker
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = s.get(&format!("/v1/services/{service}/endpoints")).await.unwrap();
    let ids = |t: &serde_json::Value| {
        let mut v: Vec<String> =
            t["endpoints"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&during), ids(&table), "the table changed while Docker was away");
    let events = s.event_history(&service).await;
    assert!(events.contains("docker_unreachable") || s.log().contains("docker unreachable"), "{events}");

    // dockerd back: the supervisor recovers by itself (ready again, two healthy instances, whatever dockerd did to
    // the containers it found)
    let up = Command::new("bash").arg(equilibrio_tests::repo_root().join("scripts/docker-up")).output().unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let start = Instant::now();
    while ready().await != 200 || healthy(&s, &service).await < 2 {
        assert!(start.elapsed() < Duration::from_secs(60), "no recovery after dockerd came back\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(s.log().contains("DockerReachable"), "{}", s.log());
}
