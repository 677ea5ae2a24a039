//! The dashboard in a real browser: headless Debian Chromium, driven by playwright-core (`tests/browser/`), loads the
//! page the supervisor serves, sees nothing but the refusal without the token, the instances with it, drains one (with a
//! table refresh between the press and the release of the click, as the page's timer can do at any moment), and sees
//! its state change and the event arrive over SSE. Saves a screenshot to `target/dashboard.png`.

// test code: a failed unwrap is a failed test
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use equilibrio_tests::backend::Backend;
use equilibrio_tests::repo_root;
use equilibrio_tests::supervisor::{Supervisor, TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_instances_and_drains_one() {
    let script = repo_root().join("tests/browser/dashboard.js");
    assert!(
        repo_root().join("tests/browser/node_modules/playwright-core").exists(),
        "playwright-core is missing: run scripts/setup (npm ci in tests/browser)"
    );
    assert!(std::path::Path::new("/usr/bin/chromium").exists(), "chromium is missing: run scripts/setup");
    let b1 = Backend::start("av-1").await.unwrap();
    let b2 = Backend::start("av-2").await.unwrap();
    let yaml = format!(
        "services:\n  agente-vendedor:\n    health_check: {{interval: 200ms, timeout: 100ms}}\n    instances: [{{id: av-1, address: '{}', zone: a}}, {{id: av-2, address: '{}', zone: b}}]\n",
        b1.addr, b2.addr
    );
    let s = Supervisor::start(&yaml).await.unwrap();
    for id in ["av-1", "av-2"] {
        s.wait_state("agente-vendedor", id, "healthy", Duration::from_secs(5)).await.unwrap();
    }
    let png = repo_root().join("target/dashboard.png");
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .arg(s.url("/"))
        .arg(TOKEN)
        .arg("av-1")
        .arg(&png)
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("drain applied"), "{text}");
    assert!(text.contains("refused without the token: a valid `Authorization: Bearer"), "{text}");
    // and the supervisor agrees
    s.wait_state("agente-vendedor", "av-1", "draining", Duration::from_secs(2)).await.unwrap();
}
