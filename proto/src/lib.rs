//! The `keywatch.v1` gRPC schema: the event model shared by sensor and collector, and the
//! `SensorService` stream. Generated from `keywatch/v1/*.proto`.

/// Package `keywatch.v1`.
pub mod v1 {
    tonic::include_proto!("keywatch.v1");
}
