//! The `keywatch.v1` gRPC schema: the event model shared by sensor and collector, and the
//! `SensorService` stream, generated from `keywatch/v1/*.proto`; and the watch syntax those
//! messages carry ([`watchspec`]), parsed the same way on both ends.

pub mod watchspec;

/// Package `keywatch.v1`.
pub mod v1 {
    tonic::include_proto!("keywatch.v1");
}
