//! Endpoint syntax: `[tcp://|udp://]ADDRESS[:PORT]` (see [`super::WatchSpec`]). The parser is
//! shared with the collector, which validates watches before they become a sensor's policy.

pub use keywatch_proto::watchspec::{Endpoint, EndpointHost, Protocol, mask, parse_endpoint};

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> Endpoint {
        parse_endpoint(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn net(addr: &str, prefix_len: u8) -> EndpointHost {
        EndpointHost::Net { addr: addr.parse().expect("address"), prefix_len }
    }

    #[test]
    fn parses_every_form() {
        let e = ok("169.254.169.254:80");
        assert_eq!((e.host, e.port, e.protocol), (net("169.254.169.254", 32), 80, Protocol::Any));
        let e = ok("[fd00:ec2::254]:80");
        assert_eq!((e.host, e.port), (net("fd00:ec2::254", 128), 80));
        let e = ok("fd00:ec2::254");
        assert_eq!((e.host, e.port), (net("fd00:ec2::254", 128), 0));
        let e = ok("[fd00::/8]:443");
        assert_eq!((e.host, e.port), (net("fd00::", 8), 443));
        let e = ok("10.1.2.3/8:443");
        assert_eq!((e.host, e.port), (net("10.0.0.0", 8), 443));
        let e = ok(":6443");
        assert_eq!((e.host, e.port), (EndpointHost::Any, 6443));
        let e = ok("*:8200");
        assert_eq!((e.host, e.port), (EndpointHost::Any, 8200));
        let e = ok("udp://:88");
        assert_eq!((e.host, e.port, e.protocol), (EndpointHost::Any, 88, Protocol::Udp));
        let e = ok("tcp://STS.amazonaws.com:443");
        assert_eq!(
            (e.host, e.port, e.protocol),
            (EndpointHost::Name("sts.amazonaws.com".into()), 443, Protocol::Tcp)
        );
        let e = ok("vault.internal");
        assert_eq!((e.host, e.port), (EndpointHost::Name("vault.internal".into()), 0));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            ":",
            "*",
            "host:0",
            "host:70000",
            "[::1",
            "[1.2.3.4]:80",
            "10.0.0.0/33:80",
            "http://x:80",
            "bad host:80",
            "[::1]80",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }
}
