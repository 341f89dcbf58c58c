//! Endpoint syntax: `[tcp://|udp://]ADDRESS[:PORT]` (see [`super::WatchSpec`]). The parser is
//! shared with the collector, which validates watches before they become a sensor's policy.

pub use keywatch_proto::watchspec::{Endpoint, EndpointHost, Protocol, mask, parse_endpoint};
