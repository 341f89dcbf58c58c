//! The sender: one `SensorService.Stream` at a time, fed from the spool in seq order.
//!
//! Reconnects wait a jittered exponential backoff (100 ms doubling to 15 s, plus up to as much
//! again of jitter); refusals that need an operator wait `refused_retry` (3 minutes).
//!
//! Per connection: `Hello`, then batches read from the first unacked seq on (a resend after a
//! lost ack is harmless: the collector skips seqs it stored), a `Heartbeat` at once and every
//! interval after; `Ack{up_to}` releases the spool, `Policy` goes to whoever applies watches.
//! At most [`MAX_IN_FLIGHT`] batches wait for their ack, so a slow collector holds the sender
//! back instead of the sender holding the whole spool in memory.
//!
//! Spooled events are sent as stored: the spool holds encoded `keywatch.v1.Event`s (seq
//! included), and [`UplinkCodec`] writes them into the `EventBatch` without decoding them.

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use backon::BackoffBuilder as _;
use keywatch_proto::v1 as pb;
use prost::{
    Message as _,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use super::{
    BatchLimits, Security, UplinkCounters,
    enroll::{self, EnrollError, Identity},
    spooler::SpoolHandle,
    tls::{self, Target},
};
use crate::spool::Gap;

/// Batches sent and not yet acked, at most.
pub const MAX_IN_FLIGHT: usize = 16;
/// Largest message accepted from the collector.
const MAX_INBOUND_BYTES: usize = 4 * 1024 * 1024;
const STREAM_PATH: &str = "/keywatch.v1.SensorService/Stream";

/// What goes up the stream.
#[derive(Debug)]
pub enum Outbound {
    Message(pb::SensorMessage),
    /// An `EventBatch` of already encoded events.
    Batch {
        host_id: Arc<str>,
        first_seq: u64,
        events: Vec<Vec<u8>>,
    },
}

/// Encodes [`Outbound`], decodes `CollectorMessage`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct OutboundEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct InboundDecoder;

impl Codec for UplinkCodec {
    type Encode = Outbound;
    type Decode = pb::CollectorMessage;
    type Encoder = OutboundEncoder;
    type Decoder = InboundDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        OutboundEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        InboundDecoder
    }
}

/// Length of a length-delimited field `field` holding `len` bytes.
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// `SensorMessage{batch: EventBatch{host_id, first_seq, events}}` with `events` copied as they
/// are (each an encoded `Event`).
pub fn encode_batch(
    host_id: &str,
    first_seq: u64,
    events: &[Vec<u8>],
    buf: &mut impl bytes::BufMut,
) {
    let mut inner = 0;
    if !host_id.is_empty() {
        inner += field_len(host_id.len());
    }
    if first_seq != 0 {
        inner += 1 + encoded_len_varint(first_seq);
    }
    inner += events.iter().map(|e| field_len(e.len())).sum::<usize>();
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(inner as u64, buf);
    if !host_id.is_empty() {
        prost::encoding::string::encode(1, &host_id.to_owned(), buf);
    }
    if first_seq != 0 {
        prost::encoding::uint64::encode(2, &first_seq, buf);
    }
    for e in events {
        encode_key(3, WireType::LengthDelimited, buf);
        encode_varint(e.len() as u64, buf);
        buf.put_slice(e);
    }
}

impl Encoder for OutboundEncoder {
    type Item = Outbound;
    type Error = Status;

    fn encode(&mut self, item: Outbound, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outbound::Message(m) => {
                m.encode(buf).map_err(|e| Status::internal(format!("encoding: {e}")))
            }
            Outbound::Batch { host_id, first_seq, events } => {
                encode_batch(&host_id, first_seq, &events, buf);
                Ok(())
            }
        }
    }
}

impl Decoder for InboundDecoder {
    type Item = pb::CollectorMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        pb::CollectorMessage::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("collector message does not decode: {e}")))
    }
}

/// A status as one line: message and, for transport failures, the underlying cause.
pub fn status_text(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// How a connection ended.
#[derive(Debug)]
enum Ended {
    Cancelled,
    /// Network trouble or a retriable refusal: reconnect after a backoff.
    Retry {
        error: String,
        progressed: bool,
    },
    /// The collector does not accept this sensor (unauthenticated, revoked, refused enrollment):
    /// an operator has to act; try again slowly.
    Refused {
        error: String,
    },
}

/// Everything the sender needs.
pub struct Sender {
    pub target: Target,
    pub security: Security,
    pub host_id: Arc<str>,
    pub hello: pb::Hello,
    pub spool: SpoolHandle,
    pub kernel_lost: watch::Receiver<Vec<(String, u64)>>,
    pub policy: watch::Sender<Option<pb::Policy>>,
    pub limits: BatchLimits,
    pub heartbeat: Duration,
    pub refused_retry: Duration,
    pub started: Instant,
    pub counters: Arc<UplinkCounters>,
    pub identity: Option<Identity>,
    /// The spool's lifetime eviction count when this process started: heartbeats report
    /// evictions since start (the collector compares heartbeats of one run).
    pub evicted_base: u64,
    /// Names the kernel's loss counters (see `Heartbeat.kernel_counters_id`); empty if unknown.
    pub kernel_counters_id: String,
}

impl Sender {
    /// Connects, streams, reconnects, until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(15))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        let mut backoff = builder.build();
        loop {
            let ended = self.connection(&cancel).await;
            self.counters.connected.store(false, Ordering::Relaxed);
            let wait = match ended {
                Ended::Cancelled => return,
                Ended::Retry { error, progressed } => {
                    if progressed {
                        backoff = builder.build();
                    }
                    let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(collector = %self.target.authority, %error, retry_in_ms = wait.as_millis() as u64, "collector link down; events stay in the spool");
                    wait
                }
                Ended::Refused { error } => {
                    backoff = builder.build();
                    tracing::error!(collector = %self.target.authority, %error, retry_in_s = self.refused_retry.as_secs(), "the collector refuses this sensor; events stay in the spool until an operator fixes it");
                    self.refused_retry
                }
            };
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The TLS config for the stream, enrolling first when needed.
    async fn tls_config(&mut self) -> Result<Option<Arc<rustls::ClientConfig>>, Ended> {
        let Security::Mtls { state_dir, token } = &self.security else { return Ok(None) };
        if self.identity.is_none() {
            self.identity = enroll::load_identity(state_dir)
                .map_err(|e| Ended::Refused { error: e.to_string() })?;
        }
        if self.identity.is_none() {
            let Some(token) = token else {
                return Err(Ended::Refused {
                    error: EnrollError::NoIdentity { dir: state_dir.clone() }.to_string(),
                });
            };
            match enroll::enroll(&self.target, token, &self.host_id, state_dir).await {
                Ok(id) => self.identity = Some(id),
                Err(e) if e.is_transient() => {
                    return Err(Ended::Retry { error: e.to_string(), progressed: false });
                }
                Err(e) => return Err(Ended::Refused { error: e.to_string() }),
            }
        }
        let id = self.identity.as_ref().expect("identity loaded or enrolled");
        tls::mtls_config(&id.ca_pem, &id.cert_pem, &id.key_pem).map(Some).map_err(|e| {
            Ended::Refused { error: format!("stored identity in {}: {e}", state_dir.display()) }
        })
    }

    fn classify(&self, status: &Status, progressed: bool) -> Ended {
        use tonic::Code;
        let error = status_text(status);
        match status.code() {
            Code::Unauthenticated
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::Unimplemented => Ended::Refused { error },
            _ => Ended::Retry { error, progressed },
        }
    }

    async fn connection(&mut self, cancel: &CancellationToken) -> Ended {
        let config = match self.tls_config().await {
            Ok(c) => c,
            Err(ended) => return ended,
        };
        let channel = match self.target.channel(config) {
            Ok(c) => c,
            Err(e) => return Ended::Retry { error: e.to_string(), progressed: false },
        };
        let (out_tx, mut out_rx) = mpsc::channel::<Outbound>(MAX_IN_FLIGHT + 4);
        let hello =
            pb::SensorMessage { msg: Some(pb::sensor_message::Msg::Hello(self.hello.clone())) };
        let _ = out_tx.try_send(Outbound::Message(hello));
        let outbound = futures_util::stream::poll_fn(move |cx| out_rx.poll_recv(cx));
        let mut grpc =
            tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_INBOUND_BYTES);
        let call = async {
            grpc.ready().await.map_err(|e| Status::unavailable(format!("connecting: {e}")))?;
            grpc.streaming(
                tonic::Request::new(outbound),
                http::uri::PathAndQuery::from_static(STREAM_PATH),
                UplinkCodec,
            )
            .await
        };
        let mut inbound = tokio::select! {
            () = cancel.cancelled() => return Ended::Cancelled,
            r = call => match r {
                Ok(response) => response.into_inner(),
                Err(status) => return self.classify(&status, false),
            },
        };
        self.counters.connected.store(true, Ordering::Relaxed);
        tracing::info!(collector = %self.target.authority, tls = self.target.tls, "connected to the collector");

        let Ok(mut next) = self.spool.first_unacked().await else { return Ended::Cancelled };
        let _ = self.spool.requeue_gaps().await;
        let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
        let mut gaps: Vec<Gap> = Vec::new();
        let mut durable = self.spool.durable.clone();
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progressed = false;
        loop {
            // Send while there is something durable and room in the window.
            let durable_next = *durable.borrow_and_update();
            if next < durable_next && in_flight.len() < MAX_IN_FLIGHT {
                let records = match self
                    .spool
                    .read(next, self.limits.max_events, self.limits.max_bytes)
                    .await
                {
                    Ok(Ok(r)) => r,
                    Ok(Err(error)) => {
                        tracing::error!(%error, "reading the spool failed");
                        return Ended::Retry { error: error.to_string(), progressed };
                    }
                    Err(_) => return Ended::Cancelled,
                };
                if records.is_empty() {
                    // Everything from `next` on was acked or evicted meanwhile.
                    let Ok(first) = self.spool.first_unacked().await else {
                        return Ended::Cancelled;
                    };
                    next = first.max(next + 1).min(durable_next);
                } else {
                    for (first_seq, events) in split_contiguous(records) {
                        let last = first_seq + events.len() as u64 - 1;
                        if first_seq > next {
                            tracing::warn!(
                                from = next,
                                to = first_seq - 1,
                                "spool gap: these events will never reach the collector"
                            );
                        }
                        in_flight.push_back((first_seq, last));
                        next = last + 1;
                        self.counters.batches_sent.fetch_add(1, Ordering::Relaxed);
                        let batch =
                            Outbound::Batch { host_id: self.host_id.clone(), first_seq, events };
                        if out_tx.send(batch).await.is_err() {
                            return Ended::Retry { error: "stream closed".into(), progressed };
                        }
                    }
                }
                // Take acks that already arrived before reading on.
                if let Some(result) = futures_util::FutureExt::now_or_never(inbound.message()) {
                    match self.on_inbound(result, &mut in_flight, &mut gaps, &mut progressed).await
                    {
                        Ok(()) => {}
                        Err(ended) => return ended,
                    }
                }
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => {
                    self.drain_acks(&mut inbound, &mut in_flight, &mut gaps).await;
                    return Ended::Cancelled;
                }
                result = inbound.message() => {
                    if let Err(ended) = self.on_inbound(result, &mut in_flight, &mut gaps, &mut progressed).await {
                        return ended;
                    }
                }
                _ = heartbeat.tick() => {
                    let new = self.spool.take_gaps().await.unwrap_or_default();
                    for g in &new {
                        tracing::warn!(first_seq = g.first_seq, last_seq = g.last_seq, events = g.events, cause = ?g.cause, "spool gap reported to the collector");
                    }
                    gaps.extend(new);
                    let hb = self.heartbeat_message();
                    if out_tx.try_send(Outbound::Message(hb)).is_err() {
                        tracing::debug!("heartbeat skipped: the stream is busy");
                    }
                }
                changed = durable.changed(), if next >= durable_next => {
                    if changed.is_err() {
                        return Ended::Cancelled;
                    }
                }
            }
        }
    }

    /// One message from the collector.
    async fn on_inbound(
        &mut self,
        result: Result<Option<pb::CollectorMessage>, Status>,
        in_flight: &mut VecDeque<(u64, u64)>,
        gaps: &mut Vec<Gap>,
        progressed: &mut bool,
    ) -> Result<(), Ended> {
        use pb::collector_message::Msg;
        match result {
            Ok(Some(pb::CollectorMessage { msg: Some(Msg::Ack(ack)) })) => {
                *progressed = true;
                while in_flight.front().is_some_and(|&(_, last)| last <= ack.up_to) {
                    in_flight.pop_front();
                }
                self.counters.acked.fetch_max(ack.up_to, Ordering::Relaxed);
                if self.spool.ack(ack.up_to).await.is_err() {
                    return Err(Ended::Cancelled);
                }
                // A gap is reported once the collector stored an event after it: it has seen the
                // jump in seqs (and the heartbeat's eviction count).
                let (done, open): (Vec<Gap>, Vec<Gap>) =
                    gaps.drain(..).partition(|g| g.last_seq < ack.up_to);
                *gaps = open;
                if !done.is_empty() {
                    let _ = self.spool.gap_reported(done).await;
                }
                Ok(())
            }
            Ok(Some(pb::CollectorMessage { msg: Some(Msg::Policy(policy)) })) => {
                tracing::info!(
                    version = policy.version,
                    watches = policy.watches.len(),
                    "policy received from the collector"
                );
                self.policy.send_replace(Some(policy));
                Ok(())
            }
            Ok(Some(pb::CollectorMessage { msg: None })) => Ok(()),
            Ok(None) => Err(Ended::Retry {
                error: "the collector closed the stream".into(),
                progressed: *progressed,
            }),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                // The collector refused a batch as malformed; it would refuse it again. Drop it
                // (the oldest unacked one: batches are processed in order) and go on.
                match in_flight.pop_front() {
                    Some((first, last)) => {
                        let n = last - first + 1;
                        self.counters.rejected_events.fetch_add(n, Ordering::Relaxed);
                        tracing::error!(first_seq = first, last_seq = last, events = n, error = %status_text(&status), "the collector refused a batch as malformed; dropping it");
                        let _ = self.spool.ack(last).await;
                        Err(Ended::Retry { error: status_text(&status), progressed: true })
                    }
                    None => Err(Ended::Refused { error: status_text(&status) }),
                }
            }
            Err(status) => Err(self.classify(&status, *progressed)),
        }
    }

    /// On shutdown: waits briefly for the acks of what is in flight, so a restart resends less.
    async fn drain_acks(
        &mut self,
        inbound: &mut tonic::Streaming<pb::CollectorMessage>,
        in_flight: &mut VecDeque<(u64, u64)>,
        gaps: &mut Vec<Gap>,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut progressed = false;
        while !in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, inbound.message()).await {
                Ok(result) => {
                    if self.on_inbound(result, in_flight, gaps, &mut progressed).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    fn heartbeat_message(&self) -> pb::SensorMessage {
        let s = &self.spool.stats;
        // Every kernel kind, zeros too: the receiver tells "none lost" from "not reported".
        let kernel_lost = self
            .kernel_lost
            .borrow()
            .iter()
            .map(|(kind, lost)| pb::LossCounter { kind: kind.clone(), lost: *lost })
            .collect();
        let sensor_lost = [
            ("spool_write_error", s.write_lost_events.load(Ordering::Relaxed)),
            ("rejected_by_collector", self.counters.rejected_events.load(Ordering::Relaxed)),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(kind, lost)| pb::LossCounter { kind: kind.to_owned(), lost })
        .collect();
        pb::SensorMessage {
            msg: Some(pb::sensor_message::Msg::Heartbeat(pb::Heartbeat {
                kernel_lost,
                kernel_counters_id: self.kernel_counters_id.clone(),
                sensor_lost,
                spool_held: s.held_events.load(Ordering::Relaxed),
                spool_corrupt_total: s.corrupt_total.load(Ordering::Relaxed),
                spool_events: s.depth_events.load(Ordering::Relaxed),
                spool_bytes: s.depth_bytes.load(Ordering::Relaxed),
                spool_evicted: s
                    .evicted_total
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.evicted_base),
                uptime_s: self.started.elapsed().as_secs(),
            })),
        }
    }
}

/// Splits records (in seq order) into runs of contiguous seqs: one `EventBatch` each.
pub fn split_contiguous(records: Vec<(u64, Vec<u8>)>) -> Vec<(u64, Vec<Vec<u8>>)> {
    let mut out: Vec<(u64, Vec<Vec<u8>>)> = Vec::new();
    for (seq, payload) in records {
        match out.last_mut() {
            Some((first, events)) if *first + events.len() as u64 == seq => events.push(payload),
            _ => out.push((seq, vec![payload])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_at_gaps() {
        let recs = vec![(5, vec![1]), (6, vec![2]), (9, vec![3]), (10, vec![4]), (12, vec![5])];
        let split = split_contiguous(recs);
        let shape: Vec<(u64, usize)> = split.iter().map(|(f, e)| (*f, e.len())).collect();
        assert_eq!(shape, [(5, 2), (9, 2), (12, 1)]);
    }

    #[test]
    fn raw_batch_encoding_decodes_as_a_sensor_message() {
        let events: Vec<pb::Event> = (7..10)
            .map(|seq| pb::Event { seq, time_ns: 1, count: 1, ..Default::default() })
            .collect();
        let raw: Vec<Vec<u8>> = events.iter().map(|e| e.encode_to_vec()).collect();
        let mut buf = Vec::new();
        encode_batch("web-1", 7, &raw, &mut buf);
        let decoded = pb::SensorMessage::decode(buf.as_slice()).expect("decodes");
        let expected = pb::SensorMessage {
            msg: Some(pb::sensor_message::Msg::Batch(pb::EventBatch {
                host_id: "web-1".into(),
                first_seq: 7,
                events,
            })),
        };
        assert_eq!(decoded, expected);
        assert_eq!(buf.len(), expected.encoded_len());
    }
}
