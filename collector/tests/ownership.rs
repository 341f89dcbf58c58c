//! The ownership model: every API method against every role, deliveries to real HTTP receivers
//! in each sink format through the persisted outbox (receiver down, collector restart),
//! escalation on a manual clock, and the audit trail.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, http::Uri};
use collector::{
    alerts::Alert,
    audit::AuditFilter,
    auth::{self, Role, TokenRecord},
    clock::{Clock, ManualClock},
    enroll::{Enroller, JoinTokenText, NewJoinToken},
    event::{Event, EventKind, Process, SecretMethod},
    outbox::{Dispatcher, OutboxConfig},
    pki::Pki,
    serve::Collector,
};
use common::*;
use keywatch_proto::v1::{self as pb, api_service_server::ApiService as _};
use serde_json::Value;
use tokio::net::TcpListener;
use tonic::{Request, Status};

/// `{HOOK}` is the receiver's base URL, `{JSONL}` a file.
const YAML: &str = r#"
kind: Watch
name: aws-credentials
category: credential
paths: ["/srv/*/.aws/credentials"]
---
kind: Watch
name: spare
category: credential
paths: ["/etc/spare"]
---
kind: Team
name: secops
route: {webhook: "{HOOK}/secops"}
---
kind: Team
name: iam
route: {webhook: "{HOOK}/iam"}
---
kind: Team
name: team-a
route:
  webhook: "{HOOK}/a"
  slack_webhook: "{HOOK}/a-slack"
  pagerduty: {url: "{HOOK}/a-pd", routing_key: RK-A}
  jsonl: "{JSONL}"
  escalate_after: 15m
  escalate_to: secops
---
kind: Team
name: team-b
---
kind: Workload
name: wa
owner: team-a
identity_type: service-account
match: {uid: 1001}
---
kind: Workload
name: wb
owner: team-b
identity_type: workload
match: {uid: 1002}
"#;

const T0: &str = "2026-12-01T10:00:00Z";

/// What the receiver got: path, `Keywatch-Delivery` header, JSON body.
type Received = Arc<Mutex<Vec<(String, String, Value)>>>;

/// A real HTTP receiver on 127.0.0.1 that records every POST.
async fn receiver(listener: TcpListener) -> Received {
    let got: Received = Arc::default();
    async fn hook(
        State(got): State<Received>,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let id = headers
            .get("keywatch-delivery")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        got.lock().expect("lock").push((uri.path().to_owned(), id, json));
        StatusCode::ACCEPTED
    }
    let app = Router::new().fallback(hook).with_state(got.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("receiver") });
    got
}

/// A receiver on a free loopback port, and its base URL.
async fn local_receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook = format!("http://{}", listener.local_addr().expect("addr"));
    (hook, receiver(listener).await)
}

fn bodies(got: &Received, path: &str) -> Vec<Value> {
    got.lock().expect("lock").iter().filter(|r| r.0 == path).map(|r| r.2.clone()).collect()
}

struct Kw {
    c: Collector,
    admin: String,
    dispatcher: Dispatcher,
}

fn fast() -> OutboxConfig {
    OutboxConfig {
        poll: Duration::from_millis(20),
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        lease: Duration::from_secs(120),
        timeout: Duration::from_secs(2),
        batch: 64,
    }
}

fn open(dir: &Path, clock: &ManualClock) -> Kw {
    let clock_dyn: Arc<dyn Clock> = Arc::new(clock.clone());
    let c = Collector::open(dir, clock_dyn).expect("open");
    let admin = put_token(&c, Role::Admin, None, "root");
    let dispatcher = c.dispatcher(fast()).expect("dispatcher");
    Kw { c, admin, dispatcher }
}

fn put_token(c: &Collector, role: Role, team: Option<&str>, name: &str) -> String {
    let secret = auth::new_secret();
    let record = TokenRecord {
        id: 0,
        name: name.into(),
        role,
        team: team.map(Into::into),
        created: c.clock.now(),
        expires: None,
    };
    c.store.put_token(&record, &auth::hash_secret(&secret)).expect("token");
    secret
}

fn req<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    r
}

fn file(yaml: &str) -> Vec<pb::SourceFile> {
    vec![pb::SourceFile { name: "test.yaml".into(), content: yaml.into() }]
}

async fn apply(api: &collector::api::Api, token: &str, yaml: &str) -> pb::ApplyResponse {
    let r = api
        .apply(req(token, pb::ApplyRequest { files: file(yaml), dry_run: false }))
        .await
        .expect("apply")
        .into_inner();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    r
}

fn setup_yaml(hook: &str, jsonl: &Path) -> String {
    YAML.replace("{HOOK}", hook).replace("{JSONL}", &jsonl.display().to_string())
}

/// A collector on a manual clock at [`T0`] with [`YAML`] applied, routing to a local receiver.
struct Declared {
    dir: tempfile::TempDir,
    hook: String,
    got: Received,
    clock: ManualClock,
    kw: Kw,
}

async fn declared() -> Declared {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, got) = local_receiver().await;
    let clock = ManualClock::new(t(T0));
    let kw = open(dir.path(), &clock);
    apply(&kw.c.api(None), &kw.admin, &setup_yaml(&hook, &dir.path().join("a.jsonl"))).await;
    Declared { dir, hook, got, clock, kw }
}

/// Evaluates and stores events as ingest does; returns the ids of new or folded alerts.
fn raise(c: &Collector, host: &str, events: Vec<Event>) -> Vec<i64> {
    let host = common::host(host, &[("env", "prod")]);
    let events = events
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e.host_id = host.id.clone();
            e.seq = c.clock.now().timestamp_nanos_opt().expect("ns") as u64 + i as u64;
            e
        })
        .collect();
    c.store.upsert_host(&host, c.clock.now()).expect("host");
    let out = c.store.write_batch(c.ingestor.evaluate(&host, events)).expect("write");
    out.new_alerts.iter().map(|a| a.id).chain(out.folded_into).collect()
}

fn wa_reads(at: &str) -> Event {
    aws(process("/usr/bin/wa", 1001), at)
}

fn wb_reads(at: &str) -> Event {
    aws(process("/usr/bin/wb", 1002), at)
}

fn alert(c: &Collector, id: i64) -> Alert {
    c.store.alert(id).expect("alert").expect("exists")
}

/// Every API method, in the scopes that decide who may call it.
#[derive(Debug, Clone, Copy)]
enum Call {
    WhoAmI,
    ApplyWatch,
    ApplyTeam,
    ApplyDetections,
    ApplyOwnWorkload,
    ApplyOtherWorkload,
    ApplyOwnChange,
    DeleteOwnChange,
    DeleteOtherWorkload,
    DeleteWatch,
    Get,
    History,
    ListAlerts,
    GetOwnAlert,
    GetOtherAlert,
    TransitionOwnAlert,
    TransitionOtherAlert,
    TimelineOwnHost,
    TimelineOtherHost,
    CreateToken,
    ListTokens,
    RevokeToken,
    ListHosts,
    RevokeHost,
    ListAudit,
}

impl Call {
    fn method(self) -> &'static str {
        use Call::*;
        match self {
            WhoAmI => "WhoAmI",
            ApplyWatch | ApplyTeam | ApplyDetections | ApplyOwnWorkload | ApplyOtherWorkload
            | ApplyOwnChange => "Apply",
            DeleteOwnChange | DeleteOtherWorkload | DeleteWatch => "Delete",
            Get => "Get",
            History => "History",
            ListAlerts => "ListAlerts",
            GetOwnAlert | GetOtherAlert => "GetAlert",
            TransitionOwnAlert | TransitionOtherAlert => "TransitionAlert",
            TimelineOwnHost | TimelineOtherHost => "Timeline",
            CreateToken => "CreateToken",
            ListTokens => "ListTokens",
            RevokeToken => "RevokeToken",
            ListHosts => "ListHosts",
            RevokeHost => "RevokeHost",
            ListAudit => "ListAudit",
        }
    }
}

const ALL: &[&str] = &["admin", "iam", "secops", "owner", "responder"];
const READERS: &[&str] = &["admin", "iam", "secops", "responder"];

/// (call, roles allowed); `owner` is team-a's owner. `sensor` is never allowed.
const MATRIX: &[(Call, &[&str])] = &[
    (Call::WhoAmI, ALL),
    (Call::ApplyWatch, &["admin", "iam"]),
    (Call::ApplyTeam, &["admin", "secops"]),
    (Call::ApplyDetections, &["admin", "secops"]),
    (Call::ApplyOwnWorkload, &["admin", "owner"]),
    (Call::ApplyOtherWorkload, &["admin"]),
    (Call::ApplyOwnChange, &["admin", "owner"]),
    (Call::DeleteOwnChange, &["admin", "owner"]),
    (Call::DeleteOtherWorkload, &["admin"]),
    (Call::DeleteWatch, &["admin", "iam"]),
    (Call::Get, ALL),
    (Call::History, ALL),
    (Call::ListAlerts, ALL),
    (Call::GetOwnAlert, ALL),
    (Call::GetOtherAlert, READERS),
    (Call::TransitionOwnAlert, &["admin", "secops", "owner"]),
    (Call::TransitionOtherAlert, &["admin", "secops"]),
    (Call::TimelineOwnHost, ALL),
    (Call::TimelineOtherHost, READERS),
    (Call::CreateToken, &["admin"]),
    (Call::ListTokens, &["admin"]),
    (Call::RevokeToken, &["admin"]),
    (Call::ListHosts, READERS),
    (Call::RevokeHost, &["admin", "secops"]),
    (Call::ListAudit, &["admin", "iam", "secops"]),
];

const CHANGE: &str = "kind: ApprovedChange\nname: CHG-A\nworkload: wa\nfrom: 2026-12-01T10:00:00Z\nuntil: 2026-12-01T12:00:00Z\nreason: rotation\n";

struct MatrixCtx {
    kw: Kw,
    api: collector::api::Api,
    enroller: Arc<Enroller>,
}

impl MatrixCtx {
    /// Makes the call valid (as admin), then makes it with `token`.
    async fn run(&self, call: Call, token: &str) -> Result<(), Status> {
        let (api, admin, c) = (&self.api, self.kw.admin.as_str(), &self.kw.c);
        let dry = |yaml: &str| pb::ApplyRequest { files: file(yaml), dry_run: true };
        let del =
            |kind: &str, name: &str| pb::DeleteRequest { kind: kind.into(), name: name.into() };
        let alert_of = |events: Vec<Event>| {
            raise(c, if events[0].process.uid == 1001 { "web-1" } else { "db-1" }, events)[0]
        };
        let timeline = |host: &str| pb::TimelineRequest { host: host.into(), ..Default::default() };
        match call {
            Call::WhoAmI => api.who_am_i(req(token, pb::WhoAmIRequest {})).await.map(drop),
            Call::ApplyWatch => api
                .apply(req(token, dry("kind: Watch\nname: w2\ncategory: credential\npaths: [/etc/w2]\n")))
                .await
                .map(drop),
            Call::ApplyTeam => api.apply(req(token, dry("kind: Team\nname: team-c\n"))).await.map(drop),
            Call::ApplyDetections => api
                .apply(req(token, dry("kind: Detections\nname: default\ngrouping_window: 2h\n")))
                .await
                .map(drop),
            Call::ApplyOwnWorkload => api
                .apply(req(token, dry("kind: Workload\nname: wa2\nowner: team-a\nidentity_type: workload\nmatch: {uid: 7}\n")))
                .await
                .map(drop),
            Call::ApplyOtherWorkload => api
                .apply(req(token, dry("kind: Workload\nname: wb2\nowner: team-b\nidentity_type: workload\nmatch: {uid: 8}\n")))
                .await
                .map(drop),
            Call::ApplyOwnChange => api.apply(req(token, dry(CHANGE))).await.map(drop),
            Call::DeleteOwnChange => {
                apply(api, admin, CHANGE).await;
                api.delete(req(token, del("ApprovedChange", "CHG-A"))).await.map(drop)
            }
            Call::DeleteOtherWorkload => {
                apply(api, admin, "kind: Workload\nname: wb3\nowner: team-b\nidentity_type: workload\nmatch: {uid: 9}\n").await;
                api.delete(req(token, del("Workload", "wb3"))).await.map(drop)
            }
            Call::DeleteWatch => {
                apply(api, admin, "kind: Watch\nname: spare2\ncategory: credential\npaths: [/etc/s2]\n").await;
                api.delete(req(token, del("Watch", "spare2"))).await.map(drop)
            }
            Call::Get => api
                .get(req(token, pb::GetRequest { kind: "workloads".into(), name: String::new() }))
                .await
                .map(drop),
            Call::History => api
                .history(req(token, pb::HistoryRequest { kind: "Workload".into(), name: "wa".into(), limit: 5 }))
                .await
                .map(drop),
            Call::ListAlerts => api.list_alerts(req(token, pb::ListAlertsRequest::default())).await.map(drop),
            Call::GetOwnAlert => {
                let id = alert_of(vec![wa_reads(T0)]);
                api.get_alert(req(token, pb::GetAlertRequest { id })).await.map(drop)
            }
            Call::GetOtherAlert => {
                let id = alert_of(vec![wb_reads(T0)]);
                api.get_alert(req(token, pb::GetAlertRequest { id })).await.map(drop)
            }
            Call::TransitionOwnAlert | Call::TransitionOtherAlert => {
                // A fresh open alert each time (the previous one is resolved by an allowed call).
                let id = alert_of(vec![if matches!(call, Call::TransitionOwnAlert) { wa_reads(T0) } else { wb_reads(T0) }]);
                let ack = pb::TransitionAlertRequest { id, status: "resolved".into(), note: "matrix".into() };
                api.transition_alert(req(token, ack)).await.map(drop)
            }
            Call::TimelineOwnHost => {
                alert_of(vec![wa_reads(T0)]);
                api.timeline(req(token, timeline("web-1"))).await.map(drop)
            }
            Call::TimelineOtherHost => {
                alert_of(vec![wb_reads(T0)]);
                api.timeline(req(token, timeline("db-1"))).await.map(drop)
            }
            Call::CreateToken => api
                .create_token(req(token, pb::CreateTokenRequest { role: "responder".into(), ..Default::default() }))
                .await
                .map(drop),
            Call::ListTokens => api.list_tokens(req(token, pb::ListTokensRequest {})).await.map(drop),
            Call::RevokeToken => {
                let id = c.store.put_token(
                    &TokenRecord { id: 0, name: "spare".into(), role: Role::Iam, team: None, created: c.clock.now(), expires: None },
                    &auth::hash_secret(&auth::new_secret()),
                ).expect("token");
                api.revoke_token(req(token, pb::RevokeTokenRequest { id: id.to_string() })).await.map(drop)
            }
            Call::ListHosts => api.list_hosts(req(token, pb::ListHostsRequest {})).await.map(drop),
            Call::RevokeHost => {
                let new = NewJoinToken { labels: BTreeMap::new(), ttl: chrono::Duration::hours(1), uses: 1, creator: "t".into() };
                let (text, record) = self.enroller.create_token(c.store.as_ref(), new).expect("join");
                c.hosts.enroll(&record.id, &text.secret_hash(), "web-9", "01", c.clock.now()).expect("enroll");
                api.revoke_host(req(token, pb::RevokeHostRequest { host_id: "web-9".into() })).await.map(drop)
            }
            Call::ListAudit => api.list_audit(req(token, pb::ListAuditRequest::default())).await.map(drop),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_method_with_every_role_is_allowed_or_permission_denied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(t(T0));
    let kw = open(dir.path(), &clock);
    let pki = Arc::new(Pki::load_or_create(dir.path(), &[]).expect("pki"));
    let clock_dyn: Arc<dyn Clock> = Arc::new(clock.clone());
    let enroller = Arc::new(Enroller::new(pki, kw.c.hosts.clone(), clock_dyn));
    let api = kw.c.api(Some(enroller.clone()));
    apply(&api, &kw.admin, &setup_yaml("http://127.0.0.1:9", &dir.path().join("a.jsonl"))).await;
    let ctx = MatrixCtx { kw, api, enroller };
    let c = &ctx.kw.c;
    let tokens: Vec<(&str, String)> = vec![
        ("admin", ctx.kw.admin.clone()),
        ("iam", put_token(c, Role::Iam, None, "ivy")),
        ("secops", put_token(c, Role::Secops, None, "sam")),
        ("owner", put_token(c, Role::Owner, Some("team-a"), "ann")),
        ("responder", put_token(c, Role::Responder, None, "rex")),
        ("sensor", put_token(c, Role::Sensor, None, "s1")),
    ];

    // Every rpc of the service has a row: a new method without one fails here.
    let proto = include_str!("../../proto/keywatch/v1/api.proto");
    let rpcs: Vec<&str> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap_or_default().trim())
        .collect();
    assert!(rpcs.len() >= 15, "{rpcs:?}");
    for rpc in &rpcs {
        assert!(MATRIX.iter().any(|(c, _)| c.method() == *rpc), "no matrix row calls {rpc}");
    }

    let mut failures = Vec::new();
    for (call, allowed) in MATRIX {
        for (role, token) in &tokens {
            let result = ctx.run(*call, token).await;
            let should = allowed.contains(role);
            match (should, &result) {
                (true, Ok(())) => {}
                (false, Err(s)) if s.code() == tonic::Code::PermissionDenied => {
                    if !s.message().contains("needs role") {
                        failures.push(format!(
                            "{call:?} as {role}: refusal does not name the role needed: {}",
                            s.message()
                        ));
                    }
                }
                _ => failures.push(format!(
                    "{call:?} as {role}: expected {}, got {result:?}",
                    if should { "success" } else { "permission_denied" }
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Owners see only their team's alerts in lists.
    let listed = ctx
        .api
        .list_alerts(req(&tokens[3].1, pb::ListAlertsRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert!(!listed.alerts.is_empty());
    assert!(listed.alerts.iter().all(|a| a.owner == "team-a"));

    // An expired token is refused as unauthenticated.
    let secret = auth::new_secret();
    let record = TokenRecord {
        id: 0,
        name: "old".into(),
        role: Role::Admin,
        team: None,
        created: clock.now(),
        expires: Some(clock.now() + chrono::Duration::minutes(5)),
    };
    c.store.put_token(&record, &auth::hash_secret(&secret)).expect("token");
    ctx.api.who_am_i(req(&secret, pb::WhoAmIRequest {})).await.expect("not yet expired");
    clock.advance(chrono::Duration::minutes(6));
    let expired = ctx.api.who_am_i(req(&secret, pb::WhoAmIRequest {})).await.expect_err("expired");
    assert_eq!(
        (expired.code(), expired.message()),
        (tonic::Code::Unauthenticated, "token expired")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_sink_format_reaches_a_real_receiver_with_the_alert_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, got) = local_receiver().await;
    let clock = ManualClock::new(t(T0));
    let kw = open(dir.path(), &clock);
    let api = kw.c.api(None);
    let jsonl = dir.path().join("team-a.jsonl");
    apply(&api, &kw.admin, &setup_yaml(&hook, &jsonl)).await;

    let id = raise(&kw.c, "web-1", vec![wa_reads(T0)])[0];
    let undeclared = raise(&kw.c, "web-1", vec![aws(process("/usr/bin/curl", 0), T0)])[0];
    let pass = kw.dispatcher.pass().await.expect("pass");
    assert_eq!((pass.delivered, pass.failed), (5, 0), "{pass:?}");

    let webhook = bodies(&got, "/a");
    assert_eq!(webhook.len(), 1);
    let w = &webhook[0];
    assert_eq!(
        (w["type"].as_str(), w["team"].as_str(), w["reason"].as_str()),
        (Some("alert"), Some("team-a"), Some("owner"))
    );
    assert!(w["delivery_id"].as_str().is_some_and(|d| d.starts_with("kwd_")));
    let a = &w["alert"];
    assert_eq!(a["id"], id);
    assert_eq!(a["rule"], "out-of-pattern");
    assert_eq!(a["workload"], "wa");
    assert_eq!(a["owner"], "team-a");
    assert_eq!(a["host"]["id"], "web-1");
    assert_eq!(a["host"]["labels"]["env"], "prod");
    assert_eq!(a["process"]["exe"], "/usr/bin/wa");
    assert_eq!(a["resource"]["watch"], "aws-credentials");
    assert_eq!(a["frameworks"]["owasp_nhi"], "NHI9 NHI Reuse");
    let header_id = got.lock().expect("lock").iter().find(|r| r.0 == "/a").map(|r| r.1.clone());
    assert_eq!(header_id.as_deref(), w["delivery_id"].as_str(), "the Keywatch-Delivery header");

    let slack = bodies(&got, "/a-slack");
    assert_eq!(slack.len(), 1);
    let text = slack[0]["text"].as_str().expect("text");
    assert!(text.contains(&format!("#{id} out-of-pattern [high] wa on web-1")), "{text}");
    let blocks = slack[0]["blocks"].as_array().expect("blocks");
    assert_eq!(blocks[0]["type"], "section");
    assert!(blocks.iter().any(|b| b.to_string().contains("*Owner*\\nteam-a")), "{blocks:?}");

    let pd = bodies(&got, "/a-pd");
    assert_eq!(pd.len(), 1);
    let pd = &pd[0];
    assert_eq!(pd["routing_key"], "RK-A");
    assert_eq!(pd["event_action"], "trigger");
    assert_eq!(pd["dedup_key"], format!("keywatch-alert-{id}"));
    assert_eq!(pd["payload"]["severity"], "error");
    assert_eq!(pd["payload"]["source"], "web-1");
    assert!(pd["payload"]["summary"].as_str().expect("summary").contains("out-of-pattern"));
    assert_eq!(pd["payload"]["custom_details"]["alert"]["workload"], "wa");

    let lines: Vec<Value> = std::fs::read_to_string(&jsonl)
        .expect("jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["alert"]["id"], id);

    // Undeclared identities go to secops.
    let secops = bodies(&got, "/secops");
    assert_eq!(secops.len(), 1);
    assert_eq!(
        (secops[0]["alert"]["id"].as_i64(), secops[0]["reason"].as_str()),
        (Some(undeclared), Some("undeclared"))
    );

    // Every delivery is visible on the alert.
    let shown = alert(&kw.c, id);
    let targets: Vec<(&str, &str, u32)> = shown
        .routed_to
        .iter()
        .map(|r| (r.target.split(' ').next().unwrap_or_default(), r.status.as_str(), r.attempts))
        .collect();
    assert_eq!(
        targets,
        vec![
            ("webhook", "delivered", 1),
            ("slack", "delivered", 1),
            ("pagerduty", "delivered", 1),
            ("jsonl", "delivered", 1)
        ]
    );
    assert!(shown.render_details().contains("routed to         team-a (owner) webhook"));
    // Nothing is sent twice.
    assert_eq!(kw.dispatcher.pass().await.expect("pass").delivered, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undeclared_use_of_a_declared_credential_reaches_secops_and_the_credential_owners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, got) = local_receiver().await;
    let clock = ManualClock::new(t(T0));
    let kw = open(dir.path(), &clock);
    let api = kw.c.api(None);
    let jsonl = dir.path().join("team-a.jsonl");
    // wa (team-a) and wb (team-b, no route) both declare the credential.
    let yaml = setup_yaml(&hook, &jsonl).replace(
        "match: {uid: 1001}",
        "match: {uid: 1001}\nexpect: {credentials: [aws-credentials]}",
    );
    let yaml = yaml.replace(
        "match: {uid: 1002}",
        "match: {uid: 1002}\nexpect: {credentials: [aws-credentials]}",
    );
    apply(&api, &kw.admin, &yaml).await;

    // The declared owner reading its own credential raises nothing.
    assert!(raise(&kw.c, "web-1", vec![wa_reads(T0)]).is_empty());
    let id = raise(&kw.c, "web-1", vec![aws(process("/usr/bin/curl", 0), T0)])[0];
    let a = alert(&kw.c, id);
    assert_eq!((a.rule.as_str(), a.owner.as_str()), ("unknown-identity", "undeclared"));
    let declared: Vec<(&str, &str)> =
        a.declared_by.iter().map(|d| (d.workload.as_str(), d.owner.as_str())).collect();
    assert_eq!(declared, vec![("wa", "team-a"), ("wb", "team-b")]);
    let pass = kw.dispatcher.pass().await.expect("pass");
    // secops' webhook, and team-a's four sinks; team-b declares no route.
    assert_eq!((pass.delivered, pass.failed), (5, 0), "{pass:?}");

    let secops = bodies(&got, "/secops");
    assert_eq!(secops.len(), 1);
    assert_eq!(
        (secops[0]["alert"]["id"].as_i64(), secops[0]["reason"].as_str()),
        (Some(id), Some("undeclared"))
    );
    let owner = bodies(&got, "/a");
    assert_eq!(owner.len(), 1);
    let b = &owner[0];
    assert_eq!(
        (b["team"].as_str(), b["reason"].as_str(), b["alert"]["id"].as_i64()),
        (Some("team-a"), Some("credential-owner"), Some(id))
    );
    assert_eq!(b["alert"]["rule"], "unknown-identity");
    assert_eq!(b["alert"]["process"]["exe"], "/usr/bin/curl");
    assert_eq!(b["alert"]["resource"]["watch"], "aws-credentials");
    assert_eq!(b["alert"]["declared_by"][0]["workload"], "wa");
    assert_eq!(b["alert"]["declared_by"][0]["owner"], "team-a");
    assert_eq!(bodies(&got, "/a-slack").len(), 1);

    let routed: Vec<(String, &str, String)> = alert(&kw.c, id)
        .routed_to
        .iter()
        .map(|r| (r.team.clone(), r.reason.as_str(), r.status.clone()))
        .collect::<Vec<_>>();
    for expected in [
        ("secops".to_owned(), "undeclared", "delivered".to_owned()),
        ("team-a".to_owned(), "credential-owner", "delivered".to_owned()),
        ("team-b".to_owned(), "credential-owner", "no-route".to_owned()),
    ] {
        assert!(routed.contains(&expected), "{expected:?} in {routed:?}");
    }
    assert!(
        alert(&kw.c, id).render_details().contains("declared by       wa (owner team-a)"),
        "{}",
        alert(&kw.c, id).render_details()
    );
}

/// Whoever reads a workload's secrets (its environ, memory, agent socket), the workload's
/// owners hear of it, beside the reader's owner or SecOps.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_misuse_reaches_the_owners_of_the_process_read() {
    let Declared { dir: _dir, got, kw, .. } = declared().await;
    let api = kw.c.api(None);
    let read_wa = |reader: Process| {
        let mut e = secret(reader, T0, SecretMethod::ProcEnviron);
        let EventKind::SecretAccess { target, .. } = &mut e.kind else { unreachable!() };
        *target = Some(Box::new(process("/usr/bin/wa", 1001)));
        e
    };

    // wb (team-b) reads wa's environ: team-b owns the alert, team-a is told.
    let id = raise(&kw.c, "web-1", vec![read_wa(process("/usr/bin/wb", 1002))])[0];
    let a = alert(&kw.c, id);
    assert_eq!((a.rule.as_str(), a.owner.as_str()), ("secret-misuse", "team-b"));
    assert_eq!(a.resource.target_workload.as_deref(), Some("wa"));
    assert!(a.summary.contains("of workload wa"), "{}", a.summary);
    let routes: Vec<(&str, &str)> =
        a.routes.iter().map(|r| (r.team.as_str(), r.reason.as_str())).collect();
    assert_eq!(routes, vec![("team-b", "owner"), ("team-a", "target-owner")]);
    kw.dispatcher.pass().await.expect("pass");
    let told = bodies(&got, "/a");
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(
        (told[0]["reason"].as_str(), told[0]["alert"]["id"].as_i64()),
        (Some("target-owner"), Some(id))
    );

    // team-a's owners may read and list the alert they were sent, not acknowledge it; team-b's
    // owners own it. A team neither owning nor told sees nothing.
    let (a_owner, c_owner) = (
        put_token(&kw.c, Role::Owner, Some("team-a"), "a"),
        put_token(&kw.c, Role::Owner, Some("team-c"), "c"),
    );
    let get = |token: &str| api.get_alert(req(token, pb::GetAlertRequest { id }));
    assert_eq!(get(&a_owner).await.expect("team-a reads it").into_inner().id, id);
    let denied = get(&c_owner).await.expect_err("team-c may not");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains("needs role iam, secops, owner of one of team-b, team-a"),
        "{}",
        denied.message()
    );
    for (token, expected) in [(&a_owner, vec![id]), (&c_owner, vec![])] {
        let r = api.list_alerts(req(token, pb::ListAlertsRequest::default())).await;
        let ids: Vec<i64> = r.expect("list").into_inner().alerts.iter().map(|a| a.id).collect();
        assert_eq!(ids, expected);
    }
    let ack = pb::TransitionAlertRequest { id, status: "acknowledged".into(), note: String::new() };
    let refused = api.transition_alert(req(&a_owner, ack)).await.expect_err("not team-a's to ack");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // An undeclared reader: SecOps owns it, team-a is told; a read of an undeclared process
    // (no victim workload) is SecOps' alone, and a separate alert.
    let id = raise(&kw.c, "web-1", vec![read_wa(process("/usr/bin/gdb", 0))])[0];
    let routes: Vec<(String, &str)> =
        alert(&kw.c, id).routes.iter().map(|r| (r.team.clone(), r.reason.as_str())).collect();
    assert_eq!(routes, vec![("secops".into(), "undeclared"), ("team-a".into(), "target-owner")]);
    let other = raise(
        &kw.c,
        "web-1",
        vec![secret(process("/usr/bin/gdb", 0), T0, SecretMethod::ProcEnviron)],
    )[0];
    assert_ne!(other, id, "another victim, another alert");
    let routes: Vec<String> = alert(&kw.c, other).routes.into_iter().map(|r| r.team).collect();
    assert_eq!(routes, vec!["secops"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_is_down_gets_the_alert_when_it_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Reserve a port, then close it: connections are refused until the receiver starts.
    let port = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let hook = format!("http://{port}");
    let clock = ManualClock::new(t(T0));
    let kw = open(dir.path(), &clock);
    let api = kw.c.api(None);
    apply(&api, &kw.admin, &setup_yaml(&hook, &dir.path().join("a.jsonl"))).await;
    let id = raise(&kw.c, "web-1", vec![wb_reads(T0), aws(process("/usr/bin/curl", 0), T0)])
        .into_iter()
        .find(|id| alert(&kw.c, *id).owner == "undeclared")
        .expect("undeclared alert");
    for round in 1..=3 {
        let pass = kw.dispatcher.pass().await.expect("pass");
        assert_eq!((pass.delivered, pass.failed), (0, 1), "round {round}");
        let r = &alert(&kw.c, id).routed_to[0];
        assert_eq!((r.status.as_str(), r.attempts), ("pending", round));
        assert!(r.last_error.as_deref().is_some_and(|e| e.contains("error")), "{r:?}");
        // Not due again before its backoff.
        assert_eq!(kw.dispatcher.pass().await.expect("pass"), Default::default());
        clock.advance(chrono::Duration::seconds(5));
    }
    let got = receiver(TcpListener::bind(port).await.expect("rebind")).await;
    let pass = kw.dispatcher.pass().await.expect("pass");
    assert_eq!(pass.delivered, 1);
    let secops = bodies(&got, "/secops");
    assert_eq!(secops.len(), 1);
    assert_eq!(secops[0]["alert"]["id"], id);
    let r = &alert(&kw.c, id).routed_to[0];
    assert_eq!((r.status.as_str(), r.attempts), ("delivered", 4));
    assert!(r.last_error.is_some(), "the last failure stays visible");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_between_alert_and_delivery_delivers_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, got) = local_receiver().await;
    let clock = ManualClock::new(t(T0));
    let (first, second) = {
        let kw = open(dir.path(), &clock);
        let api = kw.c.api(None);
        apply(&api, &kw.admin, &setup_yaml(&hook, &dir.path().join("a.jsonl"))).await;
        let first = raise(&kw.c, "web-1", vec![aws(process("/usr/bin/curl", 0), T0)])[0];
        let second = raise(&kw.c, "web-2", vec![aws(process("/usr/bin/curl", 0), T0)])[0];
        // A worker claims one of them and dies before sending it.
        let claimed =
            kw.c.store
                .claim_deliveries(clock.now(), chrono::Duration::minutes(2), 1)
                .expect("claim");
        assert_eq!(claimed.len(), 1);
        (first, second)
        // Dropped here without a delivery pass: the process is gone.
    };
    assert!(got.lock().expect("lock").is_empty());
    let kw = open(dir.path(), &clock);
    assert_eq!(kw.dispatcher.pass().await.expect("pass").delivered, 1);
    assert_eq!(kw.dispatcher.pass().await.expect("pass").delivered, 0, "the claimed one is leased");
    clock.advance(chrono::Duration::minutes(3));
    assert_eq!(kw.dispatcher.pass().await.expect("pass").delivered, 1);
    for _ in 0..3 {
        clock.advance(chrono::Duration::minutes(10));
        assert_eq!(kw.dispatcher.pass().await.expect("pass"), Default::default());
    }
    let mut ids: Vec<i64> =
        bodies(&got, "/secops").iter().map(|b| b["alert"]["id"].as_i64().expect("id")).collect();
    ids.sort();
    assert_eq!(ids, vec![first, second], "each alert delivered exactly once");

    // The worker that `serve` runs picks up what is pending at start.
    let third = raise(&kw.c, "web-3", vec![aws(process("/usr/bin/curl", 0), T0)])[0];
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(kw.c.dispatcher(fast()).expect("dispatcher").run(stop.clone()));
    for _ in 0..100 {
        if bodies(&got, "/secops").len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.expect("worker");
    assert_eq!(bodies(&got, "/secops")[2]["alert"]["id"], third);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_alert_is_delivered_at_once_not_at_the_next_poll() {
    let Declared { dir: _dir, got, clock, kw, .. } = declared().await;
    // A worker that would look again only in an hour.
    let slow = OutboxConfig { poll: Duration::from_secs(3600), ..fast() };
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(kw.c.dispatcher(slow).expect("dispatcher").run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await; // its first pass found nothing

    let host = common::host("web-9", &[("env", "prod")]);
    kw.c.store.upsert_host(&host, clock.now()).expect("host");
    let batch = common::batch("web-9", 1, &[aws(process("/usr/bin/curl", 0), T0)]);
    let ingestor = kw.c.ingestor.clone();
    let report = tokio::task::spawn_blocking(move || ingestor.ingest(&host, batch))
        .await
        .expect("ingest task")
        .expect("ingest");
    assert_eq!(report.outcome.new_alerts.len(), 1);
    for _ in 0..250 {
        if !bodies(&got, "/secops").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.expect("worker");
    let secops = bodies(&got, "/secops");
    assert_eq!(secops.len(), 1, "delivered when stored, not an hour later");
    assert_eq!(secops[0]["alert"]["id"], report.outcome.new_alerts[0].id);
}

#[tokio::test(flavor = "multi_thread")]
async fn unacknowledged_alerts_escalate_after_the_timer_and_acknowledged_ones_never() {
    let Declared { dir, hook, got, clock, kw } = declared().await;
    let api = kw.c.api(None);
    let owner = put_token(&kw.c, Role::Owner, Some("team-a"), "ann");

    let ignored = raise(&kw.c, "web-1", vec![wa_reads(T0)])[0];
    let acked = raise(&kw.c, "web-2", vec![wa_reads(T0)])[0];
    assert_ne!(ignored, acked);
    api.transition_alert(req(
        &owner,
        pb::TransitionAlertRequest {
            id: acked,
            status: "acknowledged".into(),
            note: "on it".into(),
        },
    ))
    .await
    .expect("ack");
    assert_eq!(kw.dispatcher.pass().await.expect("pass").escalated, 0);
    clock.advance(chrono::Duration::minutes(14));
    assert_eq!(kw.dispatcher.pass().await.expect("pass").escalated, 0, "not yet");
    assert!(bodies(&got, "/secops").is_empty());

    // A restart does not lose the timer.
    drop((kw, api));
    let kw = open(dir.path(), &clock);
    let api = kw.c.api(None);
    clock.advance(chrono::Duration::minutes(2));
    let pass = kw.dispatcher.pass().await.expect("pass");
    assert_eq!((pass.escalated, pass.delivered), (1, 1));
    let secops = bodies(&got, "/secops");
    assert_eq!(secops.len(), 1);
    assert_eq!(secops[0]["type"], "escalation");
    assert_eq!(secops[0]["reason"], "escalation");
    assert_eq!(secops[0]["alert"]["id"], ignored);
    assert_eq!(secops[0]["escalation"]["from_team"], "team-a");
    assert_eq!(secops[0]["escalation"]["to_team"], "secops");
    assert_eq!(secops[0]["escalation"]["level"], 1);
    let shown = alert(&kw.c, ignored);
    assert!(shown.routed_to.iter().any(|r| r.team == "secops"
        && r.reason == collector::route::Reason::Escalation
        && r.status == "delivered"));

    // Later passes escalate nothing more: secops declares no further escalation, the acked one never.
    clock.advance(chrono::Duration::hours(5));
    assert_eq!(kw.dispatcher.pass().await.expect("pass").escalated, 0);
    assert_eq!(bodies(&got, "/secops").len(), 1);
    assert!(
        alert(&kw.c, acked)
            .routed_to
            .iter()
            .all(|r| r.reason != collector::route::Reason::Escalation)
    );
    let escalations =
        kw.c.store
            .audit(&AuditFilter { kinds: vec!["alert-escalated".into()], ..Default::default() })
            .expect("audit");
    assert_eq!(escalations.len(), 1);
    assert_eq!(
        (escalations[0].object.as_str(), escalations[0].actor.role.as_str()),
        (format!("alert {ignored}").as_str(), "system")
    );

    // Chains: secops escalating on to iam fires a second level.
    let chain = setup_yaml(&hook, &dir.path().join("a.jsonl")).replace(
        "route: {webhook: \"HOOK/secops\"}".replace("HOOK", &hook).as_str(),
        &format!("route: {{webhook: \"{hook}/secops\", escalate_after: 10m, escalate_to: iam}}"),
    );
    apply(&api, &kw.admin, &chain).await;
    let third = raise(&kw.c, "web-3", vec![wa_reads(T0)])[0];
    clock.advance(chrono::Duration::minutes(16));
    assert_eq!(kw.dispatcher.pass().await.expect("pass").escalated, 1);
    clock.advance(chrono::Duration::minutes(11));
    assert_eq!(kw.dispatcher.pass().await.expect("pass").escalated, 1);
    let iam = bodies(&got, "/iam");
    assert_eq!(
        iam.last().map(|b| (b["alert"]["id"].as_i64(), b["escalation"]["level"].as_i64())),
        Some((Some(third), Some(2)))
    );

    // A loop is refused at apply, naming the cycle.
    let looped = chain.replace("escalate_to: iam", "escalate_to: team-a");
    let r = api
        .apply(req(&kw.admin, pb::ApplyRequest { files: file(&looped), dry_run: false }))
        .await
        .expect("apply")
        .into_inner();
    let messages: Vec<&str> = r.problems.iter().map(|p| p.message.as_str()).collect();
    assert!(
        messages
            .contains(&"escalation loop: secops -> team-a -> secops; an escalation chain must end"),
        "{messages:?}"
    );
    assert!(r.changes.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn each_operation_leaves_one_audit_record_with_its_actor_and_widening_notifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, got) = local_receiver().await;
    let clock = ManualClock::new(t(T0));
    let kw = open(dir.path(), &clock);
    let pki = Arc::new(Pki::load_or_create(dir.path(), &[]).expect("pki"));
    let clock_dyn: Arc<dyn Clock> = Arc::new(clock.clone());
    let enroller = Arc::new(Enroller::new(pki, kw.c.hosts.clone(), clock_dyn));
    let api = kw.c.api(Some(enroller.clone()));
    apply(&api, &kw.admin, &setup_yaml(&hook, &dir.path().join("a.jsonl"))).await;
    let audit = |kind: &str| {
        kw.c.store
            .audit(&AuditFilter { kinds: vec![kind.into()], ..Default::default() })
            .expect("audit")
    };
    assert_eq!(audit("declaration-created").len(), 8, "the setup apply: one per declaration");
    let owner = put_token(&kw.c, Role::Owner, Some("team-a"), "ann");
    let secops = put_token(&kw.c, Role::Secops, None, "sam");
    let before = kw.c.store.audit(&AuditFilter::default()).expect("audit").len();

    // Widening by the owner: one record with the revision and diff; notices to team-a and secops.
    let widened = "kind: Workload\nname: wa\nowner: team-a\nidentity_type: service-account\nmatch: {uid: 1001}\nexpect: {credentials: [aws-credentials]}\n";
    let r = apply(&api, &owner, widened).await;
    let updated = audit("declaration-updated");
    assert_eq!(updated.len(), 1);
    let u = &updated[0];
    assert_eq!(
        (u.actor.name.as_str(), u.actor.role.as_str(), u.actor.team.as_deref()),
        ("ann", "owner", Some("team-a"))
    );
    assert_eq!(u.object, "Workload wa");
    assert_eq!(u.revision, Some(r.changes[0].revision));
    assert!(
        u.details["diff"].as_str().expect("diff").contains("+   credentials:"),
        "{}",
        u.details["diff"]
    );
    assert_eq!(u.details["widened"][0], "credentials added: aws-credentials");
    kw.dispatcher.pass().await.expect("pass");
    for path in ["/a", "/secops"] {
        let notices = bodies(&got, path);
        assert_eq!(notices.len(), 1, "{path}");
        assert_eq!(notices[0]["type"], "declaration-changed");
        assert_eq!(notices[0]["change"]["workload"], "wa");
        assert_eq!(notices[0]["change"]["revision"], r.changes[0].revision);
        assert_eq!(notices[0]["change"]["widened"][0], "credentials added: aws-credentials");
    }
    assert_eq!(
        bodies(&got, "/a-slack")[0]["text"].as_str().map(|t| t.contains("widened")),
        Some(true)
    );
    // Narrowing back notifies nobody.
    apply(&api, &owner, "kind: Workload\nname: wa\nowner: team-a\nidentity_type: service-account\nmatch: {uid: 1001}\n").await;
    kw.dispatcher.pass().await.expect("pass");
    assert_eq!(bodies(&got, "/a").len(), 1);

    let id = raise(&kw.c, "web-1", vec![wa_reads(T0)])[0];
    api.transition_alert(req(
        &owner,
        pb::TransitionAlertRequest { id, status: "acknowledged".into(), note: "on it".into() },
    ))
    .await
    .expect("ack");
    api.transition_alert(req(
        &secops,
        pb::TransitionAlertRequest { id, status: "resolved".into(), note: String::new() },
    ))
    .await
    .expect("resolve");
    let tok = api
        .create_token(req(
            &kw.admin,
            pb::CreateTokenRequest {
                role: "iam".into(),
                name: "ivy".into(),
                ttl_s: 3600,
                ..Default::default()
            },
        ))
        .await
        .expect("token")
        .into_inner();
    api.revoke_token(req(&kw.admin, pb::RevokeTokenRequest { id: tok.id.to_string() }))
        .await
        .expect("revoke");
    let join = api
        .create_token(req(
            &kw.admin,
            pb::CreateTokenRequest { role: "sensor".into(), ..Default::default() },
        ))
        .await
        .expect("join")
        .into_inner();
    let text: JoinTokenText = join.token.parse().expect("join token");
    kw.c.hosts.enroll(&text.id, &text.secret_hash(), "web-7", "0a", clock.now()).expect("enroll");
    api.revoke_host(req(&secops, pb::RevokeHostRequest { host_id: "web-7".into() }))
        .await
        .expect("revoke host");
    apply(&api, &owner, CHANGE).await;
    api.delete(req(
        &owner,
        pb::DeleteRequest { kind: "ApprovedChange".into(), name: "CHG-A".into() },
    ))
    .await
    .expect("delete");

    let all = kw.c.store.audit(&AuditFilter::default()).expect("audit");
    let new: Vec<(String, String, String)> = all[before..]
        .iter()
        .map(|r| (r.kind.clone(), r.actor.name.clone(), r.object.clone()))
        .collect();
    let s = |k: &str, a: &str, o: &str| (k.to_owned(), a.to_owned(), o.to_owned());
    assert_eq!(
        new,
        vec![
            s("declaration-updated", "ann", "Workload wa"),
            s("declaration-updated", "ann", "Workload wa"),
            s("alert-acknowledged", "ann", &format!("alert {id}")),
            s("alert-resolved", "sam", &format!("alert {id}")),
            s("token-created", "root", &format!("token {}", tok.id)),
            s("token-revoked", "root", &format!("token {}", tok.id)),
            s("join-token-created", "root", &format!("join token {}", join.join_token_id)),
            s("host-enrolled", &format!("join token {}", join.join_token_id), "host web-7"),
            s("host-revoked", "sam", "host web-7"),
            s("declaration-created", "ann", "ApprovedChange CHG-A"),
            s("declaration-deleted", "ann", "ApprovedChange CHG-A"),
        ]
    );
    let ack = &all[before + 2];
    assert!(ack.actor.token_id.is_some());
    assert_eq!(ack.details["note"], "on it");
    assert_eq!(all[before + 4].details["role"], "iam");

    // Through the API: `--kind` prefixes and `--since`.
    let tokens = api
        .list_audit(req(
            &secops,
            pb::ListAuditRequest { kinds: vec!["token".into()], ..Default::default() },
        ))
        .await
        .expect("audit")
        .into_inner();
    assert_eq!(
        tokens.records.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(),
        vec!["token-created", "token-revoked"]
    );
    clock.advance(chrono::Duration::hours(1));
    let since =
        (clock.now() - chrono::Duration::minutes(1)).timestamp_nanos_opt().expect("ns") as u64;
    let recent = api
        .list_audit(req(&secops, pb::ListAuditRequest { since_ns: since, ..Default::default() }))
        .await
        .expect("audit")
        .into_inner();
    assert!(recent.records.is_empty());
}
