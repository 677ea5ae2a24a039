//! The demo image's containers a test's supervisor starts through real dockerd: listed by the service label, removed
//! when the test ends.

use std::process::Command;

/// The demo service's image (`scripts/build-demo-image`, which `scripts/test` runs).
pub const IMAGE: &str = "equilibrio/agente-vendedor:dev";

/// The containers of one service (by its `io.equilibrio.service` label); removes them when dropped.
pub struct Containers(pub String);

impl Containers {
    /// Container ids, running ones only or all.
    pub fn ids(&self, running_only: bool) -> Vec<String> {
        let label = format!("label=io.equilibrio.service={}", self.0);
        let mut args = vec!["ps", "-q", "--filter", label.as_str()];
        if !running_only {
            args.push("-a");
        }
        let out = Command::new("docker").args(&args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for id in self.ids(false) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
    }
}

/// Panics with what to run when the demo image is missing (dockerd not started, image not built).
pub fn docker_ready() {
    let ok =
        Command::new("docker").args(["image", "inspect", IMAGE]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "{IMAGE} is missing: run scripts/build-demo-image (scripts/test does; it also starts dockerd)");
}
