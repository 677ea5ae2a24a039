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
    let segments: Vec<&[u8]> = path.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
    let plugin = &state.plugin;
    match segments.as_slice() {
        [b"plugin_root_id"] => return Some(text(&plugin.root_id)),
        [b"plugin_name"] => return Some(text(&plugin.name)),
        [b"plugin_vm_id"] => return Some(text(&plugin.vm_id)),
        _ => {}
    }
    let stream = state.stream.as_deref()?;
    stream_property(stream, &segments, &state.env.route_cluster)
}

fn stream_property(s: &Stream, segments: &[&[u8]], cluster: &str) -> Option<Vec<u8>> {
    let header = |name: &str| s.request.headers.get(name).map(|v| v.as_bytes().to_vec());
    Some(match segments {
        [b"source", b"address"] => text(&s.source.to_string()),
        [b"source", b"port"] => int(i64::from(s.source.port())),
        [b"destination", b"address"] => text(&s.destination.to_string()),
        [b"destination", b"port"] => int(i64::from(s.destination.port())),
        [b"upstream", b"address"] => text(&s.upstream?.to_string()),
        [b"upstream", b"port"] => int(i64::from(s.upstream?.port())),
        [b"request", b"path"] => text(s.request.uri.path_and_query().map_or("/", |p| p.as_str())),
        [b"request", b"url_path"] => text(s.request.uri.path()),
        [b"request", b"host"] => match s.request.uri.authority() {
            Some(a) => text(a.as_str()),
            None => header("host")?,
        },
        [b"request", b"method"] => text(s.request.method.as_str()),
        [b"request", b"scheme"] => text(s.request.uri.scheme_str().unwrap_or("http")),
        [b"request", b"protocol"] => text(match s.request.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }),
        [b"request", b"id"] => header("x-request-id")?,
        [b"request", b"useragent"] => header("user-agent")?,
        [b"request", b"referer"] => header("referer")?,
        [b"request", b"time"] => {
            let d = s.started_wall.duration_since(std::time::UNIX_EPOCH).ok()?;
            int(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        }
        [b"request", b"duration"] => int(i64::try_from(s.started.elapsed().as_nanos()).unwrap_or(i64::MAX)),
        [b"response", b"code"] => int(i64::from(s.response.as_ref()?.status.as_u16())),
        [b"response", b"code_details"] => text(s.details),
        [b"response", b"flags"] => int(s.flags as i64),
        [b"connection", b"mtls"] => vec![0],
        [b"cluster_name"] => text(cluster),
        [b"route_name"] => text("default"),
        other => {
            let joined = other.join(&b"."[..]);
            return s.filter_state.iter().find(|(k, _)| *k == joined).map(|(_, v)| v.clone());
        }
    })
}

/// `proxy_set_property`: kept with the stream and readable back (Envoy's filter state).
pub fn set(state: &mut HostState, path: &[u8], value: &[u8]) -> bool {
    let Some(stream) = state.stream.as_deref_mut() else { return false };
    let key: Vec<u8> = path.split(|b| *b == 0).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(&b"."[..]);
    stream.filter_state.retain(|(k, _)| *k != key);
    stream.filter_state.push((key, value.to_vec()));
    true
}
