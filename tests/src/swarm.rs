//! Docker Swarm for the tests: the multi-node lab (`scripts/swarm-lab up`: three dockerds, each in its own network
//! namespace, one swarm; node i at 10.77.0.(10+i), labelled `io.equilibrio.zone=zone-<i>`), and the Swarm services a
//! test's supervisor creates, removed when the test ends.

use std::process::Command;

use crate::containers::docker_ready;
use crate::repo_root;

/// The lab's manager (node 1): what `DOCKER_HOST` is for the supervisor and the `docker` calls here.
pub const LAB_MANAGER: &str = "unix:///run/eqlab/n1.sock";

/// The `docker` command on the lab's manager.
pub fn docker(args: &[&str]) -> (bool, String) {
    match Command::new("docker").arg("-H").arg(LAB_MANAGER).args(args).output() {
        Ok(o) => {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            (o.status.success(), text.trim().to_string())
        }
        Err(e) => (false, e.to_string()),
    }
}

/// The lab is up with its three nodes ready and the demo image on each (`scripts/swarm-lab up 3`, which is
/// idempotent); panics with the script's output otherwise.
pub fn swarm_ready() {
    docker_ready();
    let out = Command::new("bash").arg(repo_root().join("scripts/swarm-lab")).args(["up", "3"]).output();
    let (ok, text) = match out {
        Ok(o) => (
            o.status.success(),
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        ),
        Err(e) => (false, e.to_string()),
    };
    assert!(ok, "scripts/swarm-lab up failed:\n{text}");
}

/// Stops node `i`'s daemon (as a machine that goes away); `swarm_ready` starts it again.
pub fn stop_node(i: u32) {
    let pid = std::fs::read_to_string(format!("/run/eqlab/n{i}.pid")).unwrap_or_default();
    let _ = Command::new("kill").arg(pid.trim()).output();
}

/// A Swarm service by name; removed (with its tasks) when dropped.
pub struct SwarmService(pub String);

impl SwarmService {
    /// The replica count in the service's spec (`None`: no such service).
    pub fn replicas(&self) -> Option<u32> {
        let (ok, out) = docker(&["service", "inspect", "--format", "{{.Spec.Mode.Replicated.Replicas}}", &self.0]);
        if ok { out.parse().ok() } else { None }
    }

    /// The running tasks: (task id, node hostname, container id).
    pub fn running(&self) -> Vec<(String, String, String)> {
        let format = "{{.ID}} {{.Node}} {{.CurrentState}}";
        let args = ["service", "ps", "--no-trunc", "--filter", "desired-state=running", "--format", format, &self.0];
        let (_, out) = docker(&args);
        let tasks: Vec<(String, String)> = out
            .lines()
            .filter(|l| l.contains(" Running"))
            .filter_map(|l| {
                let mut w = l.split(' ');
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect();
        tasks
            .into_iter()
            .filter_map(|(t, node)| {
                let (ok, c) = docker(&["inspect", "--format", "{{.Status.ContainerStatus.ContainerID}}", &t]);
                (ok && !c.is_empty()).then_some((t, node, c))
            })
            .collect()
    }

    /// `docker service scale`, as an operator would.
    pub fn scale_by_hand(&self, replicas: u32) {
        let (ok, out) = docker(&["service", "scale", "--detach", &format!("{}={replicas}", self.0)]);
        assert!(ok, "docker service scale: {out}");
    }
}

impl Drop for SwarmService {
    fn drop(&mut self) {
        let _ = docker(&["service", "rm", &self.0]);
    }
}
