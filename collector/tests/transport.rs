//! The sensor transport for real: `serve::start` on 127.0.0.1:0 with TLS on, clients over real
//! sockets. Enrollment with join tokens, mTLS streams, and every refusal — each while another,
//! already-connected sensor keeps streaming and getting acks.

mod common;

use std::{sync::Arc, time::Duration};

use collector::{
    enroll::JoinTokenText,
    hosts::JoinToken,
    pki::{self, Pki},
    serve::{self, Running, ServeConfig},
    timeline::TimelineEntry,
};
use common::{aws, batch, hello, payments};
use keywatch_proto::v1::{
    self as pb, api_service_client::ApiServiceClient, collector_message::Msg as Down,
    sensor_message::Msg as Up, sensor_service_client::SensorServiceClient,
};
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Status, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

struct Collector {
    running: Running,
    stop: CancellationToken,
    dir: tempfile::TempDir,
    /// Stops the collector when the test ends.
    _guard: tokio_util::sync::DropGuard,
}

impl Collector {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = ServeConfig::new(dir.path().join("data"));
        config.sensor_addr = "127.0.0.1:0".parse().expect("addr");
        config.api_addr = "127.0.0.1:0".parse().expect("addr");
        let stop = CancellationToken::new();
        let running = serve::start(config, stop.clone()).await.expect("start collector");
        let _guard = stop.clone().drop_guard();
        Self { running, stop, dir, _guard }
    }

    fn sensor_url(&self) -> String {
        format!("https://{}", self.running.sensor_addr)
    }

    fn ca_pem(&self) -> String {
        self.running.pki.ca_pem().to_owned()
    }

    fn admin(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/admin.token"))
            .expect("admin token")
            .trim()
            .to_owned()
    }

    async fn api(&self) -> ApiServiceClient<Channel> {
        let channel = Channel::from_shared(format!("https://{}", self.running.api_addr))
            .expect("url")
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca_pem())))
            .expect("tls")
            .connect()
            .await
            .expect("connect api");
        ApiServiceClient::new(channel)
    }

    fn authed<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {}", self.admin()).parse().expect("header"));
        r
    }

    /// A join token through the API, as `keywatch token create --role sensor` makes it.
    async fn join_token(&self, uses: u32, labels: &[(&str, &str)]) -> String {
        self.api()
            .await
            .create_token(self.authed(pb::CreateTokenRequest {
                role: "sensor".into(),
                labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
                uses,
                ..Default::default()
            }))
            .await
            .expect("create join token")
            .into_inner()
            .token
    }

    /// A channel without a client certificate, trusting the CA.
    async fn anonymous(&self) -> Channel {
        Channel::from_shared(self.sensor_url())
            .expect("url")
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca_pem())))
            .expect("tls")
            .connect()
            .await
            .expect("connect")
    }

    /// Enrolls `host` with `token` (verifying the collector by the token's fingerprint first).
    async fn enroll(&self, token: &str, host: &str) -> Result<Enrolled, Status> {
        enroll_with(&self.sensor_url(), self.running.sensor_addr, token, host).await
    }
}

/// A sensor's key and certificate after enrollment.
struct Enrolled {
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
}

impl Enrolled {
    async fn channel(&self, url: &str) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(url.to_owned())
            .expect("url")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&self.ca_pem))
                    .identity(Identity::from_pem(&self.cert_pem, &self.key_pem)),
            )
            .expect("tls")
            .connect()
            .await
    }
}

/// The sensor side of enrollment: the collector must present, in its chain, the certificate
/// whose SHA-256 is the token's `ca_fp`, and the leaf must validate against it as the only root.
#[derive(Debug)]
struct FingerprintVerifier {
    ca_fp: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca =
            intermediates.iter().find(|c| pki::fingerprint(c) == self.ca_fp).ok_or_else(|| {
                rustls::Error::General(
                    "the collector presented no CA with the join token's fingerprint".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects with the fingerprint verifier; returns the CA certificate (PEM) it found.
async fn verify_collector(
    addr: std::net::SocketAddr,
    token: &JoinTokenText,
) -> Result<String, std::io::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(FingerprintVerifier { ca_fp: token.ca_fp.clone(), provider });
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .dangerous()
    .with_custom_certificate_verifier(verifier)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let ca = chain
        .iter()
        .find(|c| pki::fingerprint(c) == token.ca_fp)
        .ok_or_else(|| std::io::Error::other("CA not in chain"))?;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca);
    let lines: Vec<&str> =
        b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    Ok(format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n")))
}

fn csr(host: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = rcgen::CertificateParams::new(vec![host.into()]).expect("params");
    let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
    (csr, key.serialize_pem())
}

async fn enroll_with(
    url: &str,
    addr: std::net::SocketAddr,
    token: &str,
    host: &str,
) -> Result<Enrolled, Status> {
    let parsed: JoinTokenText = token
        .parse()
        .map_err(|e: collector::enroll::MalformedToken| Status::unauthenticated(e.to_string()))?;
    let ca_pem = verify_collector(addr, &parsed)
        .await
        .map_err(|e| Status::unavailable(format!("collector not verified: {e}")))?;
    let channel = Channel::from_shared(url.to_owned())
        .expect("url")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))
        .expect("tls")
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (csr_pem, key_pem) = csr(host);
    let r = SensorServiceClient::new(channel)
        .enroll(pb::EnrollRequest { token: token.into(), host_id: host.into(), csr_pem })
        .await?
        .into_inner();
    Ok(Enrolled { cert_pem: r.certificate_pem, key_pem, ca_pem: r.ca_pem })
}

/// An open sensor stream.
struct Stream {
    tx: mpsc::Sender<pb::SensorMessage>,
    rx: Streaming<pb::CollectorMessage>,
    host: String,
    seq: u64,
}

impl Stream {
    /// Opens a stream and sends the Hello; returns once the Policy arrived (or the refusal).
    async fn open(channel: Channel, hello: pb::Hello) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(16);
        let host = hello.host_id.clone();
        tx.send(pb::SensorMessage { msg: Some(Up::Hello(hello)) }).await.expect("queue hello");
        let mut client = SensorServiceClient::new(channel);
        let mut rx = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        match rx.message().await? {
            Some(pb::CollectorMessage { msg: Some(Down::Policy(_)) }) => {}
            other => panic!("expected the policy first, got {other:?}"),
        }
        Ok(Self { tx, rx, host, seq: 1 })
    }

    /// Sends one batch and waits for its ack.
    async fn batch_acked(&mut self) -> Result<(), Status> {
        let first = self.seq;
        let b = batch(&self.host, first, &[aws(payments(), "2026-12-01T10:00:00Z")]);
        self.tx.send(pb::SensorMessage { msg: Some(Up::Batch(b)) }).await.expect("queue batch");
        loop {
            match self.rx.message().await? {
                Some(pb::CollectorMessage { msg: Some(Down::Ack(a)) }) => {
                    assert_eq!(a.up_to, first);
                    self.seq += 1;
                    return Ok(());
                }
                Some(_) => continue,
                None => return Err(Status::unknown("stream ended")),
            }
        }
    }

    async fn send(&self, msg: Up) {
        self.tx.send(pb::SensorMessage { msg: Some(msg) }).await.expect("queue");
    }
}

fn expect_refused<T>(r: Result<T, Status>, code: Code, text: &str) {
    match r {
        Ok(_) => panic!("expected {code:?} ({text}), got success"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(text), "{:?} does not contain {text:?}", s.message());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_streams_and_every_refusal_while_another_sensor_streams() {
    let c = Collector::start().await;
    let url = c.sensor_url();

    // A valid enrollment, then a stream that is accepted and acked; enrollment labels win.
    let token = c.join_token(1, &[("env", "prod"), ("tier", "web")]).await;
    assert!(token.starts_with("kwj1."));
    let a = c.enroll(&token, "web-1").await.expect("enroll web-1");
    let mut a_hello = hello("web-1");
    a_hello.labels.insert("env".into(), "dev".into());
    let mut alive = Stream::open(a.channel(&url).await.expect("connect"), a_hello)
        .await
        .expect("stream accepted");
    alive.batch_acked().await.expect("ack");
    let hosts = c.running.store.host_summaries().expect("hosts");
    let web1 = hosts.iter().find(|h| h.host_id == "web-1").expect("web-1 listed");
    assert_eq!(web1.labels.get("env").map(String::as_str), Some("prod"));
    assert_eq!(web1.labels.get("tier").map(String::as_str), Some("web"));
    assert!(web1.cert_serial.is_some());

    // Reused single-use token.
    expect_refused(c.enroll(&token, "web-9").await, Code::Unauthenticated, "has no uses left");
    alive.batch_acked().await.expect("other stream still served");

    // Forged: right id, wrong secret.
    let mut forged: JoinTokenText = c.join_token(1, &[]).await.parse().expect("token");
    forged.secret = JoinTokenText::generate(&forged.ca_fp).secret;
    expect_refused(
        c.enroll(&forged.to_string(), "web-9").await,
        Code::Unauthenticated,
        "does not match",
    );
    alive.batch_acked().await.expect("other stream still served");

    // Expired.
    let expired = JoinTokenText::generate(&c.running.pki.ca_fingerprint());
    let now = chrono::Utc::now();
    let record = JoinToken {
        id: expired.id.clone(),
        role: "sensor".into(),
        labels: Default::default(),
        created: now - chrono::Duration::hours(2),
        expires: now - chrono::Duration::hours(1),
        uses_left: 1,
        creator: "test".into(),
        revoked: None,
    };
    c.running.store.put_join_token(&record, &expired.secret_hash()).expect("store token");
    expect_refused(
        c.enroll(&expired.to_string(), "web-9").await,
        Code::Unauthenticated,
        "expired at",
    );
    alive.batch_acked().await.expect("other stream still served");

    // A token of another collector's CA: the sensor-side fingerprint check refuses the
    // collector before anything is sent; sent anyway, the collector refuses it too.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = Pki::load_or_create(other_dir.path(), &[]).expect("other CA");
    let foreign = JoinTokenText::generate(&other.ca_fingerprint());
    let refused = verify_collector(c.running.sensor_addr, &foreign).await;
    let err = refused.expect_err("fingerprint check must refuse");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    let direct = SensorServiceClient::new(c.anonymous().await)
        .enroll(pb::EnrollRequest {
            token: foreign.to_string(),
            host_id: "web-9".into(),
            csr_pem: csr("web-9").0,
        })
        .await;
    expect_refused(direct, Code::Unauthenticated, "another collector CA");
    alive.batch_acked().await.expect("other stream still served");

    // Unknown client certificate (signed by another CA).
    let (other_csr, other_key) = csr("web-1");
    let issued = other.sign_client_csr(&other_csr, "web-1").expect("sign");
    let stranger =
        Enrolled { cert_pem: issued.certificate_pem, key_pem: other_key, ca_pem: c.ca_pem() };
    let result = match stranger.channel(&url).await {
        Err(_) => Err(Status::unavailable("handshake refused")),
        Ok(ch) => Stream::open(ch, hello("web-1")).await.map(|_| ()),
    };
    assert!(result.is_err(), "a certificate of another CA must be refused");
    alive.batch_acked().await.expect("other stream still served");

    // No client certificate on Stream.
    expect_refused(
        Stream::open(c.anonymous().await, hello("web-1")).await,
        Code::Unauthenticated,
        "client certificate is required",
    );
    // A Hello naming another host than the certificate.
    expect_refused(
        Stream::open(a.channel(&url).await.expect("connect"), hello("db-1")).await,
        Code::PermissionDenied,
        "certificate is for web-1",
    );
    alive.batch_acked().await.expect("other stream still served");

    // Plaintext client against the TLS port.
    let plain = async {
        let ch = Channel::from_shared(format!("http://{}", c.running.sensor_addr))
            .expect("url")
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Stream::open(ch, hello("web-1")).await.map(|_| ())
    };
    let plain = tokio::time::timeout(Duration::from_secs(15), plain).await.expect("no hang");
    assert!(plain.is_err(), "plaintext must be refused");
    alive.batch_acked().await.expect("other stream still served");

    // A malformed message ends that stream with invalid_argument.
    let t = c.join_token(3, &[]).await;
    let b = c.enroll(&t, "web-2").await.expect("enroll web-2");
    let mut raw = tonic::client::Grpc::new(b.channel(&url).await.expect("connect"));
    raw.ready().await.expect("ready");
    let (raw_tx, raw_rx) = mpsc::channel::<Vec<u8>>(4);
    use prost::Message as _;
    raw_tx
        .send(pb::SensorMessage { msg: Some(Up::Hello(hello("web-2"))) }.encode_to_vec())
        .await
        .expect("queue");
    // Field 2 (batch), length-delimited, claiming far more bytes than follow.
    raw_tx.send(vec![0x12, 0xff, 0xff, 0x03, 0x01]).await.expect("queue");
    let mut down = raw
        .streaming(
            Request::new(ReceiverStream::new(raw_rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/keywatch.v1.SensorService/Stream",
            ),
            RawCodec,
        )
        .await
        .expect("stream opened")
        .into_inner();
    let mut outcome = Ok(());
    loop {
        match down.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(s) => {
                outcome = Err(s);
                break;
            }
        }
    }
    expect_refused(outcome, Code::InvalidArgument, "malformed message");
    alive.batch_acked().await.expect("other stream still served");

    // An oversized message ends that stream with resource_exhausted.
    let big = Stream::open(b.channel(&url).await.expect("connect"), hello("web-2"))
        .await
        .expect("stream");
    let mut huge = hello("web-2");
    huge.labels.insert("padding".into(), "x".repeat(5 * 1024 * 1024));
    big.send(Up::Hello(huge)).await;
    let mut rx = big.rx;
    let mut outcome = Ok(());
    loop {
        match rx.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(s) => {
                outcome = Err(s);
                break;
            }
        }
    }
    expect_refused(outcome, Code::ResourceExhausted, "larger than");
    alive.batch_acked().await.expect("other stream still served");

    // Revoked host: its open stream is cut within a second, a new one is refused.
    let mut victim = Stream::open(b.channel(&url).await.expect("connect"), hello("web-2"))
        .await
        .expect("stream");
    victim.batch_acked().await.expect("ack before revocation");
    c.api()
        .await
        .revoke_host(c.authed(pb::RevokeHostRequest { host_id: "web-2".into() }))
        .await
        .expect("revoke");
    let cut = tokio::time::timeout(Duration::from_secs(1), victim.rx.message())
        .await
        .expect("the open stream must end within a second");
    expect_refused(cut, Code::PermissionDenied, "host web-2 is revoked");
    expect_refused(
        Stream::open(b.channel(&url).await.expect("connect"), hello("web-2")).await,
        Code::PermissionDenied,
        "host web-2 is revoked",
    );
    let listed = c.running.store.host_summaries().expect("hosts");
    assert!(listed.iter().any(|h| h.host_id == "web-2" && h.revoked.is_some()));
    alive.batch_acked().await.expect("other stream still served");

    // Re-enrolling a host replaces its serial: the old certificate is refused.
    let b2 = c.enroll(&t, "web-2").await.expect("re-enroll web-2");
    expect_refused(
        Stream::open(b.channel(&url).await.expect("connect"), hello("web-2")).await,
        Code::PermissionDenied,
        "replaced by a later enrollment",
    );
    Stream::open(b2.channel(&url).await.expect("connect"), hello("web-2"))
        .await
        .expect("new certificate accepted")
        .batch_acked()
        .await
        .expect("ack");
    alive.batch_acked().await.expect("other stream still served");

    // The health service answers on the sensor port.
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.anonymous().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "keywatch.v1.SensorService".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_spool_evictions_show_as_gaps_on_the_timeline() {
    let c = Collector::start().await;
    let url = c.sensor_url();
    let token = c.join_token(1, &[]).await;
    let e = c.enroll(&token, "web-3").await.expect("enroll");
    let mut s =
        Stream::open(e.channel(&url).await.expect("connect"), hello("web-3")).await.expect("open");
    let beat = |uptime_s, spool_evicted| {
        Up::Heartbeat(pb::Heartbeat {
            kernel_lost: vec![pb::LossCounter { kind: "file-access".into(), lost: 0 }],
            spool_events: 10,
            spool_bytes: 4096,
            spool_evicted,
            uptime_s,
            ..Default::default()
        })
    };
    s.send(beat(10, 0)).await;
    s.send(beat(20, 250)).await;
    s.send(beat(30, 250)).await;
    s.send(beat(40, 300)).await;
    // A batch after the heartbeats: its ack means they were handled (one message at a time).
    s.batch_acked().await.expect("ack");

    let page = c
        .api()
        .await
        .timeline(c.authed(pb::TimelineRequest {
            host: "web-3".into(),
            kinds: vec!["gap".into()],
            ..Default::default()
        }))
        .await
        .expect("timeline")
        .into_inner();
    let gaps: Vec<TimelineEntry> =
        page.entries.iter().map(|e| serde_json::from_str(&e.json).expect("entry")).collect();
    assert_eq!(
        gaps.iter().map(|g| (g.kind.as_str(), g.lost)).collect::<Vec<_>>(),
        [("gap", Some(250)), ("gap", Some(50))]
    );
    assert!(gaps[0].summary.contains("evicted"), "{}", gaps[0].summary);

    let hosts = c.running.store.host_summaries().expect("hosts");
    let h = hosts.iter().find(|h| h.host_id == "web-3").expect("listed");
    let hb = h.heartbeat.as_ref().expect("heartbeat stored");
    assert_eq!((hb.spool_evicted, hb.spool_events, hb.spool_bytes), (300, 10, 4096));
}

/// Sends raw bytes as messages (to send what does not decode); decodes replies as usual.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

struct RawEncoder;
struct ReplyDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use prost::bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ReplyDecoder {
    type Item = pb::CollectorMessage;
    type Error = Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::CollectorMessage>, Status> {
        use prost::Message as _;
        pb::CollectorMessage::decode(src).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = pb::CollectorMessage;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ReplyDecoder {
        ReplyDecoder
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_with_unavailable_after_acking_what_is_stored() {
    let c = Collector::start().await;
    let url = c.sensor_url();
    let token = c.join_token(1, &[]).await;
    let e = c.enroll(&token, "web-4").await.expect("enroll");
    let mut s =
        Stream::open(e.channel(&url).await.expect("connect"), hello("web-4")).await.expect("open");
    s.batch_acked().await.expect("ack");
    c.stop.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .expect("the stream ends promptly");
    expect_refused(end, Code::Unavailable, "shutting down");
    let Collector { running, dir, .. } = c;
    let store = running.store.clone();
    tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .expect("the collector stops")
        .expect("clean stop");
    assert!(store.host_summaries().expect("hosts").iter().any(|h| h.host_id == "web-4"));
    drop(dir);
}
