//! Envoy's REST EDS answer (`DiscoveryResponse` of one `ClusterLoadAssignment`), made from the endpoints of a table:
//! Envoy's cluster membership and the filter's choices come from the same list, so they always agree. Healthy
//! endpoints are `HEALTHY`, draining ones `DRAINING` (Envoy's `override_host` still reaches them for their sticky
//! sessions), the rest `UNHEALTHY`.

use serde_json::{Value, json};

use crate::table::{Endpoint, EndpointState};

const TYPE_URL: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The answer for `cluster` at table `version`. Endpoints whose address is not an `ip:port` are left out.
pub fn discovery_response(cluster: &str, version: u64, endpoints: &[Endpoint]) -> Value {
    let lb_endpoints: Vec<Value> = endpoints
        .iter()
        .filter_map(|e| {
            let addr: std::net::SocketAddr = e.address.parse().ok()?;
            let health = match e.state {
                EndpointState::Healthy => "HEALTHY",
                EndpointState::Draining => "DRAINING",
                EndpointState::Unhealthy => "UNHEALTHY",
            };
            Some(json!({
                "endpoint": {"address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}},
                "health_status": health,
                "load_balancing_weight": e.weight.max(1),
            }))
        })
        .collect();
    json!({
        "version_info": version.to_string(),
        "type_url": TYPE_URL,
        "resources": [{
            "@type": TYPE_URL,
            "cluster_name": cluster,
            "endpoints": [{"lb_endpoints": lb_endpoints}],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, address: &str, weight: u32, state: EndpointState) -> Endpoint {
        Endpoint { id: id.into(), address: address.into(), weight, state, zone: String::new(), tags: Vec::new() }
    }

    #[test]
    fn states_map_to_envoy_health_and_weights_are_at_least_one() {
        let eps = [
            endpoint("a", "127.0.0.1:1", 100, EndpointState::Healthy),
            endpoint("b", "[::1]:2", 0, EndpointState::Draining),
            endpoint("c", "127.0.0.1:3", 5, EndpointState::Unhealthy),
            endpoint("d", "not-an-address", 5, EndpointState::Healthy),
        ];
        let r = discovery_response("backend", 42, &eps);
        assert_eq!(r["version_info"], "42");
        assert_eq!(r["resources"][0]["cluster_name"], "backend");
        let lb = r["resources"][0]["endpoints"][0]["lb_endpoints"].as_array().unwrap();
        assert_eq!(lb.len(), 3, "the endpoint without an ip:port is left out");
        let health: Vec<&str> = lb.iter().map(|e| e["health_status"].as_str().unwrap()).collect();
        assert_eq!(health, ["HEALTHY", "DRAINING", "UNHEALTHY"]);
        assert_eq!(lb[1]["load_balancing_weight"], 1);
        assert_eq!(lb[1]["endpoint"]["address"]["socket_address"]["address"], "::1");
    }
}
