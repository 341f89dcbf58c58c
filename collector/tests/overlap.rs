//! One sensor stream sending batches back to back, so the collector prepares each batch while
//! the one before it is being written: every seq is stored and counted once, acks come in
//! order, and the alerts are those of processing the same batches one at a time.

mod common;

use std::{sync::Arc, time::Duration};

use collector::{
    ingest::{TrustHello, sensor_server},
    serve::Collector,
    store::AlertFilter,
};
use common::*;
use keywatch_proto::v1::{
    self as pb, collector_message::Msg as Down, sensor_message::Msg as Up,
    sensor_service_client::SensorServiceClient,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const BATCHES: u64 = 40;
const NOW: &str = "2026-12-01T12:00:00Z";

/// The event with sequence number `seq`, the same whenever it is sent again. Batch `b` (seqs
/// `100b+1..=100b+100`) is at day `40 * (b / 2)`, odd batches 30 minutes later: an even batch's
/// `payments-api` read comes after 39 silent days (dormant), an odd batch's after 30 minutes
/// (not dormant, but only if the batch before it counts as activity), and the undeclared reads
/// of an odd batch fold into the alert of the batch before it.
fn event(seq: u64) -> collector::event::Event {
    let b = (seq - 1) / 100;
    let at = t(NOW)
        + chrono::Duration::days(40 * (b / 2) as i64)
        + chrono::Duration::minutes(30 * (b % 2) as i64)
        + chrono::Duration::seconds(((seq - 1) % 100) as i64);
    let at = at.to_rfc3339();
    let mut e = if seq % 100 == 10 {
        aws(process("/usr/local/bin/payments-api", 1001), &at)
    } else {
        aws(process("/usr/bin/cat", 0), &at)
    };
    e.seq = seq;
    e
}

/// Seqs `first..=last` as one wire batch.
fn range(first: u64, last: u64) -> pb::EventBatch {
    let events: Vec<_> = (first..=last).map(event).collect();
    batch("web-1", first, &events)
}

/// Batch `b` covers seqs up to `100(b+1)`, starting 50 seqs back into the batch before it;
/// every seventh batch is also sent again right after itself.
fn batches() -> Vec<pb::EventBatch> {
    let mut out = Vec::new();
    for b in 0..BATCHES {
        let b_batch = range((100 * b).saturating_sub(49).max(1), 100 * b + 100);
        out.push(b_batch.clone());
        if b % 7 == 3 {
            out.push(b_batch);
        }
    }
    out
}

/// Alerts as comparable tuples, sorted.
fn alerts(c: &Collector) -> Vec<(String, String, u64, String, String)> {
    let mut out: Vec<_> = c
        .store
        .alerts(&AlertFilter { limit: 100_000, ..AlertFilter::default() })
        .expect("alerts")
        .into_iter()
        .map(|a| {
            (
                a.rule.as_str().to_owned(),
                a.workload.clone(),
                a.count,
                a.first_seen.to_rfc3339(),
                a.last_seen.to_rfc3339(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_batches_are_stored_once_acked_in_order_and_alert_as_one_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _clock) = collector(dir.path(), NOW);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(sensor_server(c.ingestor.clone(), Arc::new(TrustHello)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let mut client = SensorServiceClient::connect(url).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    tx.send(pb::SensorMessage { msg: Some(Up::Hello(hello("web-1"))) }).await.expect("send");
    let sent = batches();
    // Everything at once: the collector reads the next batch while storing the one before.
    for b in sent.clone() {
        tx.send(pb::SensorMessage { msg: Some(Up::Batch(b)) }).await.expect("send");
    }
    let mut acks = Vec::new();
    while acks.len() < sent.len() {
        let m = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .expect("a reply within 30 s")
            .expect("stream ok")
            .and_then(|m| m.msg)
            .expect("a message");
        match m {
            Down::Ack(ack) => {
                // Everything an ack covers is stored when it arrives.
                let known = c.store.known_seqs("web-1", 1..=ack.up_to).expect("seqs");
                assert_eq!(
                    known.len() as u64,
                    ack.up_to,
                    "ack {} before its batch was stored",
                    ack.up_to
                );
                acks.push(ack.up_to);
            }
            Down::Policy(_) => {}
        }
    }
    let expected: Vec<u64> = sent.iter().map(|b| b.first_seq + b.events.len() as u64 - 1).collect();
    assert_eq!(acks, expected, "one ack per batch, in order");
    assert!(acks.windows(2).all(|w| w[0] <= w[1]));
    let total = 100 * BATCHES;
    assert_eq!(c.store.known_seqs("web-1", 1..=total + 100).expect("seqs").len() as u64, total);

    // Every event counted once by the alerts it raised, and the alerts those of sequential
    // processing of the same batches.
    let streamed = alerts(&c);
    let counted: u64 = streamed.iter().filter(|a| a.0 == "unknown-identity").map(|a| a.2).sum();
    let dormant = streamed.iter().filter(|a| a.0 == "dormant-identity").count() as u64;
    let other = tempfile::tempdir().expect("tempdir");
    let (seq, _clock) = collector(other.path(), NOW);
    let host = seq.ingestor.hello(&hello("web-1")).expect("hello");
    for b in sent {
        seq.ingestor.ingest(&host, b).expect("ingest");
    }
    assert_eq!(streamed, alerts(&seq));
    assert_eq!(counted, total - BATCHES, "each undeclared read counted once");
    assert_eq!(dormant, BATCHES / 2 - 1, "dormant only after the 39 silent days: {streamed:?}");
}
