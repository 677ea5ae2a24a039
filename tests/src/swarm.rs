//! Docker Swarm for the tests: the test machine's dockerd made a one-node swarm (`docker swarm init --advertise-addr
//! 127.0.0.1` when it is not in one yet, its node labelled with a zone), and the Swarm services a test's supervisor
//! creates, removed when the test ends.

use std::process::Command;

use crate::containers::docker_ready;

/// The zone the test node carries (`io.equilibrio.zone`).
pub const NODE_ZONE: &str = "zone-a";

fn docker(args: &[&str]) -> (bool, String) {
    match Command::new("docker").args(args).output() {
        Ok(o) => {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            (o.status.success(), text.trim().to_string())
        }
        Err(e) => (false, e.to_string()),
    }
}

/// The demo image is there and the daemon is a swarm manager whose node carries [`NODE_ZONE`]; panics saying what
/// failed otherwise.
pub fn swarm_ready() {
    docker_ready();
    let (_, state) = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
    if state != "active" {
        let (ok, out) = docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        assert!(ok, "docker swarm init failed: {out}");
    }
    let (_, node) = docker(&["info", "--format", "{{.Swarm.NodeID}}"]);
    let (ok, out) = docker(&["node", "update", "--label-add", &format!("io.equilibrio.zone={NODE_ZONE}"), &node]);
    assert!(ok, "labelling the swarm node failed: {out}");
}

/// A Swarm service by name; removed (with its tasks) when dropped.
pub struct SwarmService(pub String);

impl SwarmService {
    /// The replica count in the service's spec (`None`: no such service).
    pub fn replicas(&self) -> Option<u32> {
        let (ok, out) = docker(&["service", "inspect", "--format", "{{.Spec.Mode.Replicated.Replicas}}", &self.0]);
        if ok { out.parse().ok() } else { None }
    }

    /// The running tasks: (task id, container id).
    pub fn running(&self) -> Vec<(String, String)> {
        let (_, out) = docker(&[
            "service",
            "ps",
            "--no-trunc",
            "--filter",
            "desired-state=running",
            "--format",
            "{{.ID}} {{.CurrentState}}",
            &self.0,
        ]);
        let tasks: Vec<String> = out
            .lines()
            .filter(|l| l.contains(" Running"))
            .filter_map(|l| l.split(' ').next())
            .map(String::from)
            .collect();
        tasks
            .into_iter()
            .filter_map(|t| {
                let (ok, c) = docker(&["inspect", "--format", "{{.Status.ContainerStatus.ContainerID}}", &t]);
                (ok && !c.is_empty()).then_some((t, c))
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
