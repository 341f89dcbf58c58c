//! The real gRPC services in-process: a sensor stream over a loopback socket (ack only after
//! storage, dedup on resend) and the API with bearer tokens and roles.

mod common;

use std::{
    collections::{HashMap, HashSet},
    ops::RangeInclusive,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use collector::{
    alerts::{Alert, AlertStatus},
    api::{Api, api_server},
    audit::{AuditFilter, AuditRecord},
    auth::TokenRecord,
    clock::{Clock, ManualClock},
    correlate::RevisionRef,
    declarations::Kind,
    event::Host,
    hosts::{Enrollment, Gap, HeartbeatRecord, HostSummary, JoinToken},
    ingest::{Ingestor, TrustHello, sensor_server},
    registry::RegistryHandle,
    route::{NewDelivery, Sink},
    store::{
        AlertFilter, ApiTokenRow, ClaimedDelivery, DeclarationChange, DueEscalation, Store,
        StoreError, StoredDeclaration, WriteBatch, WriteOutcome, sqlite::SqliteStore,
    },
    timeline::{TimelinePage, TimelineQuery},
};
use common::*;
use keywatch_proto::v1::{
    self as pb, api_service_client::ApiServiceClient, collector_message::Msg as Down,
    sensor_message::Msg as Up, sensor_service_client::SensorServiceClient,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

/// A store whose `write_batch` waits until the test opens the gate.
struct GatedStore {
    inner: SqliteStore,
    open: Mutex<bool>,
    changed: Condvar,
}

impl GatedStore {
    fn set(&self, open: bool) {
        *self.open.lock().expect("gate") = open;
        self.changed.notify_all();
    }
}

impl Store for GatedStore {
    fn declarations(&self) -> Result<Vec<StoredDeclaration>, StoreError> {
        self.inner.declarations()
    }
    fn commit_declarations(
        &self,
        c: Vec<DeclarationChange>,
        a: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<RevisionRef>, StoreError> {
        self.inner.commit_declarations(c, a, at)
    }
    fn history(&self, k: Kind, n: &str, l: usize) -> Result<Vec<RevisionRef>, StoreError> {
        self.inner.history(k, n, l)
    }
    fn workload_revisions(
        &self,
        n: usize,
    ) -> Result<HashMap<String, Vec<RevisionRef>>, StoreError> {
        self.inner.workload_revisions(n)
    }
    fn upsert_host(&self, h: &Host, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.inner.upsert_host(h, at)
    }
    fn host(&self, id: &str) -> Result<Option<Host>, StoreError> {
        self.inner.host(id)
    }
    fn stored_up_to(&self, h: &str, spool: &str) -> Result<u64, StoreError> {
        self.inner.stored_up_to(h, spool)
    }
    fn known_seqs(&self, h: &str, s: RangeInclusive<u64>) -> Result<HashSet<u64>, StoreError> {
        self.inner.known_seqs(h, s)
    }
    fn write_batch(&self, b: WriteBatch) -> Result<WriteOutcome, StoreError> {
        let mut open = self.open.lock().expect("gate");
        while !*open {
            open = self.changed.wait(open).expect("gate");
        }
        drop(open);
        self.inner.write_batch(b)
    }
    fn activity(&self) -> Result<HashMap<String, DateTime<Utc>>, StoreError> {
        self.inner.activity()
    }
    fn alerts(&self, f: &AlertFilter) -> Result<Vec<Alert>, StoreError> {
        self.inner.alerts(f)
    }
    fn alert(&self, id: i64) -> Result<Option<Alert>, StoreError> {
        self.inner.alert(id)
    }
    fn transition(
        &self,
        id: i64,
        to: AlertStatus,
        a: &str,
        n: Option<String>,
        at: DateTime<Utc>,
    ) -> Result<Alert, StoreError> {
        self.inner.transition(id, to, a, n, at)
    }
    fn timeline(&self, q: &TimelineQuery) -> Result<TimelinePage, StoreError> {
        self.inner.timeline(q)
    }
    fn put_token(&self, r: &TokenRecord, h: &str) -> Result<i64, StoreError> {
        self.inner.put_token(r, h)
    }
    fn token(&self, h: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.token(h)
    }
    fn api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError> {
        self.inner.api_tokens()
    }
    fn revoke_api_token(&self, id: i64, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.inner.revoke_api_token(id, at)
    }
    fn put_join_token(&self, t: &JoinToken, h: &str) -> Result<(), StoreError> {
        self.inner.put_join_token(t, h)
    }
    fn join_tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        self.inner.join_tokens()
    }
    fn revoke_join_token(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.inner.revoke_join_token(id, at)
    }
    fn enroll(
        &self,
        t: &str,
        h: &str,
        host: &str,
        serial: &str,
        at: DateTime<Utc>,
    ) -> Result<Enrollment, StoreError> {
        self.inner.enroll(t, h, host, serial, at)
    }
    fn enrollments(&self) -> Result<Vec<Enrollment>, StoreError> {
        self.inner.enrollments()
    }
    fn revoke_host(&self, host: &str, at: DateTime<Utc>) -> Result<Enrollment, StoreError> {
        self.inner.revoke_host(host, at)
    }
    fn record_heartbeat(&self, host: &str, b: &HeartbeatRecord) -> Result<Vec<Gap>, StoreError> {
        self.inner.record_heartbeat(host, b)
    }
    fn host_summaries(&self) -> Result<Vec<HostSummary>, StoreError> {
        self.inner.host_summaries()
    }
    fn prune(&self, b: DateTime<Utc>) -> Result<u64, StoreError> {
        self.inner.prune(b)
    }
    fn host_workloads(&self, h: &str) -> Result<Vec<String>, StoreError> {
        self.inner.host_workloads(h)
    }
    fn append_audit(&self, r: Vec<AuditRecord>) -> Result<(), StoreError> {
        self.inner.append_audit(r)
    }
    fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.audit(f)
    }
    fn enqueue(&self, d: Vec<NewDelivery>, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.inner.enqueue(d, at)
    }
    fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
        limit: usize,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        self.inner.claim_deliveries(now, lease, limit)
    }
    fn finish_delivery(
        &self,
        id: i64,
        e: Option<String>,
        at: DateTime<Utc>,
        retry: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.inner.finish_delivery(id, e, at, retry)
    }
    fn due_escalations(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueEscalation>, StoreError> {
        self.inner.due_escalations(now, limit)
    }
    fn fire_escalation(
        &self,
        e: &DueEscalation,
        sinks: Vec<Sink>,
        next: Option<(chrono::Duration, String)>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.inner.fire_escalation(e, sinks, next, at)
    }
}

struct Running {
    gated: Arc<GatedStore>,
    store: Arc<dyn Store>,
    sensor_url: String,
    api_url: String,
    admin: String,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let gated = Arc::new(GatedStore {
        inner: SqliteStore::open(dir.path()).expect("store"),
        open: Mutex::new(true),
        changed: Condvar::new(),
    });
    let store: Arc<dyn Store> = gated.clone();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(t("2026-12-01T12:00:00Z")));
    let registry = Arc::new(RegistryHandle::load(store.clone(), clock.clone()).expect("registry"));
    registry
        .apply(&[("detect.yaml".into(), DETECT_YAML.into())], "test", false, &|_, _| Ok(()))
        .expect("apply");
    let ingestor = Arc::new(
        Ingestor::new(store.clone(), registry.clone(), clock.clone(), None).expect("ingestor"),
    );
    let admin = collector::auth::new_secret();
    let record = TokenRecord {
        id: 0,
        name: "admin".into(),
        role: collector::auth::Role::Admin,
        team: None,
        created: clock.now(),
        expires: None,
    };
    store.put_token(&record, &collector::auth::hash_secret(&admin)).expect("token");

    let sensor = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sensor_url = format!("http://{}", sensor.local_addr().expect("addr"));
    let api_url = format!("http://{}", api.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(sensor_server(ingestor, Arc::new(TrustHello)))
            .serve_with_incoming(TcpListenerStream::new(sensor)),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(api_server(Api::new(store.clone(), registry, clock)))
            .serve_with_incoming(TcpListenerStream::new(api)),
    );
    Running { gated, store, sensor_url, api_url, admin, _dir: dir }
}

fn msg(m: Up) -> pb::SensorMessage {
    pb::SensorMessage { msg: Some(m) }
}

async fn next(inbound: &mut tonic::Streaming<pb::CollectorMessage>) -> Down {
    tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("a reply within 10 s")
        .expect("stream ok")
        .and_then(|m| m.msg)
        .expect("a message")
}

/// A sensor stream of `host` that said Hello, and the policy it got back.
async fn open_stream(
    r: &Running,
    host: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::SensorMessage>,
    tonic::Streaming<pb::CollectorMessage>,
    pb::Policy,
) {
    let mut client = SensorServiceClient::connect(r.sensor_url.clone()).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    tx.send(msg(Up::Hello(hello(host)))).await.expect("send");
    let Down::Policy(policy) = next(&mut inbound).await else { panic!("policy first") };
    (tx, inbound, policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_acked_only_after_it_is_stored_and_a_resend_is_deduplicated() {
    let r = start().await;
    let (tx, mut inbound, policy) = open_stream(&r, "web-1").await;
    let names: Vec<&str> = policy.watches.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, vec!["aws-credentials", "aws-sts", "ssh-agent", "ssh-keys"]);

    // Hold storage: no ack may arrive.
    r.gated.set(false);
    let events: Vec<_> =
        (0..50).map(|_| aws(process("/usr/bin/cat", 0), "2026-12-01T12:00:00Z")).collect();
    let b = batch("web-1", 1, &events);
    tx.send(msg(Up::Batch(b.clone()))).await.expect("send");
    let early = tokio::time::timeout(Duration::from_millis(300), inbound.message()).await;
    assert!(early.is_err(), "an ack arrived before the batch was stored: {early:?}");
    let stored_now = r.store.known_seqs("web-1", 1..=50).expect("seqs").len();
    assert_eq!(stored_now, 0);

    // Release storage: the ack comes, and everything it covers is in the store.
    r.gated.set(true);
    let Down::Ack(ack) = next(&mut inbound).await else { panic!("ack") };
    assert_eq!(ack.up_to, 50);
    assert_eq!(r.store.known_seqs("web-1", 1..=50).expect("seqs").len(), 50);
    let alerts = r.store.alerts(&AlertFilter::default()).expect("alerts");
    assert_eq!(alerts.iter().map(|a| a.count).collect::<Vec<_>>(), vec![50]);

    // Resend (as after a lost ack): acked again, stored once.
    tx.send(msg(Up::Batch(b))).await.expect("send");
    let Down::Ack(ack) = next(&mut inbound).await else { panic!("ack") };
    assert_eq!(ack.up_to, 50);
    let alerts = r.store.alerts(&AlertFilter::default()).expect("alerts");
    assert_eq!(
        alerts.iter().map(|a| a.count).collect::<Vec<_>>(),
        vec![50],
        "the resend was not counted"
    );
    let page = r
        .store
        .timeline(&TimelineQuery {
            host_id: "web-1".into(),
            from: t("2026-01-01T00:00:00Z"),
            to: t("2027-01-01T00:00:00Z"),
            pid: None,
            kinds: vec!["file-access".into()],
            after: None,
            limit: 1_000,
        })
        .expect("timeline");
    assert_eq!(page.entries.len(), 50);

    // A batch that makes no sense ends the stream with invalid_argument.
    let mut bad = batch("web-1", 51, &events[..1]);
    bad.events[0].process = None;
    tx.send(msg(Up::Batch(bad))).await.expect("send");
    let status = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("reply")
        .expect_err("error");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "event seq 51: process is missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_ahead_of_a_refused_one_are_stored_and_acked_first_in_order() {
    let r = start().await;
    let (tx, mut inbound, _) = open_stream(&r, "web-1").await;

    // Storage held: the stream reads, prepares and queues batches behind the one being written.
    r.gated.set(false);
    let events: Vec<_> =
        (0..10).map(|_| aws(process("/usr/bin/cat", 0), "2026-12-01T12:00:00Z")).collect();
    for first in [1, 11, 21] {
        tx.send(msg(Up::Batch(batch("web-1", first, &events)))).await.expect("send");
    }
    let mut bad = batch("web-1", 31, &events[..1]);
    bad.events[0].time_ns = 0;
    tx.send(msg(Up::Batch(bad))).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.gated.set(true);
    for up_to in [10, 20, 30] {
        let Down::Ack(ack) = next(&mut inbound).await else { panic!("an ack") };
        assert_eq!(ack.up_to, up_to);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("reply")
        .expect_err("the refusal comes after the acks");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(r.store.known_seqs("web-1", 1..=40).expect("seqs").len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_must_start_with_hello() {
    let r = start().await;
    let mut client = SensorServiceClient::connect(r.sensor_url.clone()).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    tx.send(msg(Up::Batch(batch("web-1", 1, &[])))).await.expect("send");
    let status = inbound.message().await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}

fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_checks_tokens_and_roles() {
    let r = start().await;
    let mut api = ApiServiceClient::connect(r.api_url.clone()).await.expect("connect");

    let anonymous = api.who_am_i(pb::WhoAmIRequest {}).await.expect_err("no token");
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    let wrong =
        api.who_am_i(with_token("kw_nope", pb::WhoAmIRequest {})).await.expect_err("bad token");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    let me =
        api.who_am_i(with_token(&r.admin, pb::WhoAmIRequest {})).await.expect("admin").into_inner();
    assert_eq!((me.name.as_str(), me.role.as_str()), ("admin", "admin"));

    // An owner token for team-payments.
    let owner = api
        .create_token(with_token(
            &r.admin,
            pb::CreateTokenRequest {
                role: "owner".into(),
                team: "team-payments".into(),
                name: "pat".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("create")
        .into_inner()
        .token;
    let denied = api
        .create_token(with_token(
            &owner,
            pb::CreateTokenRequest { role: "admin".into(), ..Default::default() },
        ))
        .await
        .expect_err("owner cannot mint tokens");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    // The owner may change its own workload but not a Watch: both problems reported, nothing applied.
    let yaml = "kind: Watch\nname: new-watch\ncategory: credential\npaths: [/etc/x]\n---\n\
                kind: ApprovedChange\nname: CHG-9\nworkload: payments-api\nfrom: 2026-12-01T10:00:00Z\n\
                until: 2026-12-01T11:00:00Z\nreason: test\n";
    let files = vec![pb::SourceFile { name: "mixed.yaml".into(), content: yaml.into() }];
    let denied = api
        .apply(with_token(&owner, pb::ApplyRequest { files: files.clone(), dry_run: false }))
        .await
        .expect_err("an owner may not change a Watch");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "Watch new-watch: role owner (team team-payments) may not change Watch declarations; needs role iam or admin"
    );
    let resp = api
        .apply(with_token(
            &owner,
            pb::ApplyRequest {
                files: vec![pb::SourceFile {
                    name: "chg.yaml".into(),
                    content: yaml.split("---\n").nth(1).expect("doc").into(),
                }],
                dry_run: false,
            },
        ))
        .await
        .expect("apply call")
        .into_inner();
    assert!(resp.problems.is_empty(), "{:?}", resp.problems);
    assert_eq!(resp.changes[0].action, "created");
    let history = api
        .history(with_token(
            &owner,
            pb::HistoryRequest { kind: "approvedchange".into(), name: "CHG-9".into(), limit: 5 },
        ))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(history.revisions[0].author, "pat (owner:team-payments)");

    // Alerts: raised by ingest, listed, acknowledged with the actor recorded; an owner of
    // another team sees none of them.
    let yaml_team = "kind: Team\nname: team-web\n";
    api.apply(with_token(
        &r.admin,
        pb::ApplyRequest {
            files: vec![pb::SourceFile { name: "t.yaml".into(), content: yaml_team.into() }],
            dry_run: false,
        },
    ))
    .await
    .expect("team");
    let mut sensor = SensorServiceClient::connect(r.sensor_url.clone()).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut inbound = sensor.stream(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    tx.send(msg(Up::Hello(hello("web-1")))).await.expect("hello");
    let _policy = next(&mut inbound).await;
    tx.send(msg(Up::Batch(batch("web-1", 1, &[aws(payments(), "2026-12-01T20:00:00Z")]))))
        .await
        .expect("batch");
    let Down::Ack(_) = next(&mut inbound).await else { panic!("ack") };

    let list = api
        .list_alerts(with_token(
            &owner,
            pb::ListAlertsRequest { status: "open".into(), ..Default::default() },
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.alerts.len(), 1);
    assert_eq!(
        (list.alerts[0].rule.as_str(), list.alerts[0].owner.as_str()),
        ("out-of-window", "team-payments")
    );
    let web_owner = api
        .create_token(with_token(
            &r.admin,
            pb::CreateTokenRequest {
                role: "owner".into(),
                team: "team-web".into(),
                name: "wes".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("create")
        .into_inner()
        .token;
    let theirs = api
        .list_alerts(with_token(&web_owner, pb::ListAlertsRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert!(theirs.alerts.is_empty());
    let id = list.alerts[0].id;
    let denied = api
        .transition_alert(with_token(
            &web_owner,
            pb::TransitionAlertRequest { id, status: "acknowledged".into(), note: String::new() },
        ))
        .await
        .expect_err("other team");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let acked = api
        .transition_alert(with_token(
            &owner,
            pb::TransitionAlertRequest { id, status: "acknowledged".into(), note: "mine".into() },
        ))
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(acked.status, "acknowledged");
    let full: Alert = serde_json::from_str(&acked.json).expect("alert json");
    assert_eq!(full.transitions[0].actor, "pat (owner:team-payments)");
    let again = api
        .transition_alert(with_token(
            &owner,
            pb::TransitionAlertRequest { id, status: "acknowledged".into(), note: String::new() },
        ))
        .await
        .expect_err("already acknowledged");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        again.message(),
        format!("alert {id} is acknowledged; it cannot become acknowledged")
    );

    // Timeline through the API; an unknown host is not_found.
    let tl = api
        .timeline(with_token(
            &r.admin,
            pb::TimelineRequest { host: "web-1".into(), ..Default::default() },
        ))
        .await
        .expect("timeline")
        .into_inner();
    assert_eq!(
        tl.entries.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        vec!["file-access", "alert"]
    );
    let missing = api
        .timeline(with_token(
            &r.admin,
            pb::TimelineRequest { host: "nope".into(), ..Default::default() },
        ))
        .await
        .expect_err("unknown host");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // Owners read timelines of hosts their workloads run on (events correlated to them).
    let owner_timeline = api
        .timeline(with_token(
            &owner,
            pb::TimelineRequest { host: "web-1".into(), ..Default::default() },
        ))
        .await
        .expect("payments-api runs on web-1")
        .into_inner();
    assert_eq!(owner_timeline.entries.len(), 2);
    let other = api
        .timeline(with_token(
            &web_owner,
            pb::TimelineRequest { host: "web-1".into(), ..Default::default() },
        ))
        .await
        .expect_err("no team-web workload runs on web-1");
    assert_eq!(other.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        other.message(),
        "role owner (team team-web) may not read the timeline of host web-1; needs role iam, secops, owner of team-payments, responder or admin"
    );
}
