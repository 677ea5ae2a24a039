//! The properties filters read with `proxy_get_property`, encoded as Envoy encodes them: strings as bytes,
//! integers as 8 little-endian bytes, booleans as one byte. Paths arrive as NUL-separated segments.

use crate::context::{HostState, Stream};

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn text(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// The value of a property, or `None` when it is unknown or not available now.
pub fn get(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    // the SDKs end the path with a NUL; match on the rest as is (no split, no allocation)
    let path = path.strip_suffix(&[0]).unwrap_or(path);
    let plugin = &state.plugin;
    match path {
        b"plugin_root_id" => return Some(text(&plugin.root_id)),
        b"plugin_name" => return Some(text(&plugin.name)),
        b"plugin_vm_id" => return Some(text(&plugin.vm_id)),
        _ => {}
    }
    let stream = state.stream_ref()?;
    stream_property(stream, path, &state.env.route_cluster)
}

fn stream_property(s: &Stream, path: &[u8], cluster: &str) -> Option<Vec<u8>> {
    let header = |name: &str| s.request.headers.get(name).map(|v| v.as_bytes().to_vec());
    Some(match path {
        b"source\0address" => text(&s.source.to_string()),
        b"source\0port" => int(i64::from(s.source.port())),
        b"destination\0address" => text(&s.destination.to_string()),
        b"destination\0port" => int(i64::from(s.destination.port())),
        b"upstream\0address" => text(&s.upstream?.to_string()),
        b"upstream\0port" => int(i64::from(s.upstream?.port())),
        b"request\0path" => text(s.request.uri.path_and_query().map_or("/", |p| p.as_str())),
        b"request\0url_path" => text(s.request.uri.path()),
        b"request\0host" => match s.request.uri.authority() {
            Some(a) => text(a.as_str()),
            None => header("host")?,
        },
        b"request\0method" => text(s.request.method.as_str()),
        b"request\0scheme" => text(s.request.uri.scheme_str().unwrap_or("http")),
        b"request\0protocol" => text(match s.request.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }),
        b"request\0id" => header("x-request-id")?,
        b"request\0useragent" => header("user-agent")?,
        b"request\0referer" => header("referer")?,
        b"request\0time" => {
            // the wall clock at the start, from the monotonic one (one clock read per request saved)
            let started = std::time::SystemTime::now().checked_sub(s.started.elapsed())?;
            let d = started.duration_since(std::time::UNIX_EPOCH).ok()?;
            int(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        }
        b"request\0duration" => int(i64::try_from(s.started.elapsed().as_nanos()).unwrap_or(i64::MAX)),
        b"response\0code" => int(i64::from(s.response.as_ref()?.status.as_u16())),
        b"response\0code_details" => text(s.details),
        b"response\0flags" => int(s.flags as i64),
        b"connection\0mtls" => vec![0],
        b"cluster_name" => text(cluster),
        b"route_name" => text("default"),
        // Envoy's filter state: a value set under a one-segment path reads back; a read names only its first segment
        // (it would descend into a structured value, and a set value is bytes), so a longer path reads nothing
        other if other.contains(&0) => return None,
        other => return s.filter_state.iter().find(|(k, _)| k == other).map(|(_, v)| v.clone()),
    })
}

/// `proxy_set_property`: kept with the stream under its whole path (Envoy's filter state, `wasm.<path>`).
pub fn set(state: &mut HostState, path: &[u8], value: &[u8]) -> bool {
    let Some(stream) = state.stream_mut() else { return false };
    let key = path.strip_suffix(&[0]).unwrap_or(path).to_vec();
    stream.filter_state.retain(|(k, _)| *k != key);
    stream.filter_state.push((key, value.to_vec()));
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::context::{Env, PluginInfo};

    fn state() -> HostState {
        let plugin = Arc::new(PluginInfo {
            name: "f".into(),
            root_id: "root".into(),
            vm_id: "vm".into(),
            configuration: vec![],
            vm_configuration: vec![],
        });
        let env = Arc::new(Env {
            stats: Arc::default(),
            shared: Arc::default(),
            log_level: crate::config::LogLevel::Info,
            clusters: vec![],
            route_cluster: "backend".into(),
            limits: crate::context::VmLimits::default(),
        });
        let mut s = HostState::new(plugin, env);
        let (parts, ()) = http::Request::builder().uri("/a?b=1").body(()).unwrap().into_parts();
        let mut stream = Stream::new(parts, "127.0.0.1:5000".parse().unwrap(), "127.0.0.1:10000".parse().unwrap());
        stream.upstream = Some("127.0.0.1:8080".parse().unwrap());
        stream.flags = 0x20;
        s.stream = Some(Box::new(stream));
        s
    }

    #[test]
    fn paths_with_or_without_the_trailing_nul() {
        let s = state();
        assert_eq!(get(&s, b"upstream\0address\0").unwrap(), b"127.0.0.1:8080");
        assert_eq!(get(&s, b"upstream\0address").unwrap(), b"127.0.0.1:8080");
        assert_eq!(get(&s, b"plugin_root_id\0").unwrap(), b"root");
        assert_eq!(get(&s, b"request\0path\0").unwrap(), b"/a?b=1");
        assert_eq!(get(&s, b"request\0url_path").unwrap(), b"/a");
        assert_eq!(get(&s, b"response\0flags").unwrap(), 0x20i64.to_le_bytes());
        assert_eq!(get(&s, b"source\0port").unwrap(), 5000i64.to_le_bytes());
        assert!(get(&s, b"response\0code").is_none(), "no response yet");
        assert!(get(&s, b"no\0such").is_none());
    }

    #[test]
    fn set_properties_read_back_as_envoy_reads_them() {
        let mut s = state();
        assert!(set(&mut s, b"my_key\0", b"v1"));
        assert!(set(&mut s, b"my_key", b"v2"));
        assert_eq!(get(&s, b"my_key\0").unwrap(), b"v2");
        // Envoy looks a read up by its first segment only: a value set under a longer path is not read back
        assert!(set(&mut s, b"my\0key", b"v3"));
        assert!(get(&s, b"my\0key").is_none());
        s.stream = None;
        assert!(!set(&mut s, b"my\0key", b"v"));
    }
}
