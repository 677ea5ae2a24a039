//! Reading cookies from a `Cookie` request header (RFC 6265 section 5.4 form: `a=1; b=2`).
//!
//! Lenient on purpose: a malformed pair is skipped, never an error, because the header comes from the client.

/// All values of the cookies called `name`, in header order (a client may send the same name twice).
pub fn values<'a>(header: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    header.split(';').filter_map(move |pair| {
        let (k, v) = pair.split_once('=')?;
        if k.trim() == name {
            let v = v.trim();
            Some(v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_value_of_a_name() {
        let h = "a=1; SESSION=x.y; junk; b = 2 ;SESSION=\"q\"";
        assert_eq!(values(h, "SESSION").collect::<Vec<_>>(), vec!["x.y", "q"]);
        assert_eq!(values(h, "b").collect::<Vec<_>>(), vec!["2"]);
        assert_eq!(values(h, "missing").count(), 0);
        assert_eq!(values("", "a").count(), 0);
    }
}
