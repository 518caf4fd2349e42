//! Mutual TLS: client certificates from the configured CA, certificate-only logins,
//! password-and-certificate users, and the refusals (no certificate, another CA, an
//! expired certificate, a token replayed from another certificate).

use std::path::Path;

use airlock::config::ServiceConfig;
use arrow_flight::sql::client::FlightSqlServiceClient;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::*;

/// A CA that signs a server certificate (localhost) and client certificates.
pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `cn`, with `sans` as DNS names; `expired` puts its
    /// validity in the past.
    pub fn issue(&self, cn: &str, sans: &[&str], expired: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The demo's users plus `etl` (certificate only, CN=etl, analyst) and `boss` (the
/// owner's password and CN=boss, owner).
fn users_file(dir: &Path, config: &ServiceConfig) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&config.users_file).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let owner_hash = table["users"]["owner"]["password_hash"].as_str().unwrap();
    let extra = format!(
        "\n[users.etl]\nlogin = \"certificate\"\ncertificate = \"CN=etl\"\nroles = [\"analyst\"]\n\n\
         [users.boss]\npassword_hash = \"{owner_hash}\"\nlogin = \"password_and_certificate\"\ncertificate = \"DNS:boss.example\"\nroles = [\"owner\"]\n"
    );
    let path = dir.join("users.toml");
    std::fs::write(&path, text + extra.as_str()).unwrap();
    path
}

struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Airlock test CA");
        let (cert, key) = ca.issue("localhost", &["localhost"], false);
        std::fs::write(dir.path().join("server.crt"), cert).unwrap();
        std::fs::write(dir.path().join("server.key"), key).unwrap();
        std::fs::write(dir.path().join("ca.crt"), &ca.cert_pem).unwrap();
        Self { dir, ca }
    }

    fn config(&self) -> ServiceConfig {
        let mut config = demo_config();
        config.users_file = users_file(self.dir.path(), &config);
        config.tls = Some(airlock::config::TlsFiles {
            cert: self.dir.path().join("server.crt"),
            key: self.dir.path().join("server.key"),
            client_ca: Some(self.dir.path().join("ca.crt")),
        });
        config
    }
}

/// A TLS channel trusting the test CA, presenting `identity` if given.
async fn tls_channel(
    server: &airlock::server::Running,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn select_one(c: &mut FlightSqlServiceClient<Channel>) -> Result<usize, tonic::Status> {
    query(c, "SELECT 1 AS one").await.map(|b| rows(&b))
}

#[tokio::test]
async fn client_certificates_log_in_alone_or_with_a_password() {
    let pki = Pki::new();
    let server = start_with(pki.config()).await;
    let ca = &pki.ca.cert_pem;

    // Certificate only: no handshake, no authorization header.
    let etl = pki.ca.issue("etl", &[], false);
    let mut c = FlightSqlServiceClient::new(tls_channel(&server, ca, Some(&etl)).await.unwrap());
    assert_eq!(select_one(&mut c).await.unwrap(), 1);
    let grouped = query(
        &mut c,
        "SELECT ward, count(*) FROM hospital.patients GROUP BY ward",
    )
    .await
    .unwrap();
    assert!(rows(&grouped) > 0);
    // etl is an analyst: raw rows still need the owner's approval.
    assert_refused(
        query(&mut c, "SELECT name FROM hospital.patients").await,
        "APPROVAL_PENDING",
    );

    // A password user, with any certificate of the CA (here etl's).
    let mut c = FlightSqlServiceClient::new(tls_channel(&server, ca, Some(&etl)).await.unwrap());
    c.handshake("analyst", "analyst").await.unwrap();
    assert_eq!(select_one(&mut c).await.unwrap(), 1);

    // boss needs the password and a certificate naming DNS:boss.example.
    let boss = pki.ca.issue("someone", &["boss.example"], false);
    let mut c = FlightSqlServiceClient::new(tls_channel(&server, ca, Some(&boss)).await.unwrap());
    c.handshake("boss", "owner").await.unwrap();
    assert_eq!(select_one(&mut c).await.unwrap(), 1);
    let token = c.token().unwrap().clone();
    let mut wrong =
        FlightSqlServiceClient::new(tls_channel(&server, ca, Some(&etl)).await.unwrap());
    let err = wrong.handshake("boss", "owner").await.unwrap_err();
    assert!(
        format!("{err:?}").contains("client certificate"),
        "the right password with another certificate: {err:?}"
    );
    // boss's token is good only with boss's certificate.
    wrong.set_token(token);
    let err = select_one(&mut wrong).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // A certificate that names no certificate user, and no credentials.
    let stranger = pki.ca.issue("stranger", &[], false);
    let mut c =
        FlightSqlServiceClient::new(tls_channel(&server, ca, Some(&stranger)).await.unwrap());
    let err = select_one(&mut c).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}

/// The TLS layer refuses a connection without a certificate, with one from another CA,
/// and with an expired one: the call fails before the service sees it.
#[tokio::test]
async fn connections_without_a_valid_client_certificate_are_refused() {
    let pki = Pki::new();
    let server = start_with(pki.config()).await;
    let ca = &pki.ca.cert_pem;
    let other = TestCa::new("Another CA");
    let cases = [
        ("no certificate", None),
        ("another CA", Some(other.issue("etl", &[], false))),
        ("expired", Some(pki.ca.issue("etl", &[], true))),
    ];
    for (what, identity) in cases {
        let refused = match tls_channel(&server, ca, identity.as_ref()).await {
            Err(_) => true,
            Ok(ch) => {
                let mut c = FlightSqlServiceClient::new(ch);
                let r = c.handshake("analyst", "analyst").await;
                r.is_err()
            }
        };
        assert!(refused, "{what}: the connection must be refused");
    }
    // A plaintext client neither.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = FlightSqlServiceClient::new(ch);
        assert!(c.handshake("analyst", "analyst").await.is_err());
    }
    // And the right certificate still works on the same server.
    let etl = pki.ca.issue("etl", &[], false);
    let mut c = FlightSqlServiceClient::new(tls_channel(&server, ca, Some(&etl)).await.unwrap());
    assert_eq!(select_one(&mut c).await.unwrap(), 1);
}

/// Certificate users without mutual TLS, and quotas for unknown users, do not start.
#[tokio::test]
async fn certificate_users_need_mutual_tls() {
    let pki = Pki::new();
    let mut config = pki.config();
    config.tls.as_mut().unwrap().client_ca = None;
    let err = airlock::server::Airlock::build(config).await.unwrap_err();
    assert!(err.to_string().contains("mutual TLS is off"), "{err}");
    let mut config = demo_config();
    config.limits.user_quotas.insert(
        "nobody".into(),
        (airlock::config::QuotaOverride::default(), None),
    );
    let err = airlock::server::Airlock::build(config).await.unwrap_err();
    assert!(err.to_string().contains("limits.users.nobody"), "{err}");
}
