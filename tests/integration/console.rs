//! The owner console over real HTTP: sign-in, the owner's and the analyst's views,
//! decisions, CSRF, security headers, and who sees what.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use airlock::client::{Client, Error};
use airlock::config::ServiceConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const RAW: &str = "SELECT * FROM hospital.patients WHERE age > 88";
const VISITS: &str = "SELECT * FROM hospital.visits WHERE patient_id < 3";

/// The demo plus a nurse who may approve visits only, with the console on a free port.
fn config(dir: &Path) -> ServiceConfig {
    let root = env!("CARGO_MANIFEST_DIR");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for f in ["model.conf", "tables.toml"] {
        std::fs::copy(format!("{root}/policies/{f}"), policies.join(f)).unwrap();
    }
    let mut policy = std::fs::read_to_string(format!("{root}/policies/policy.csv")).unwrap();
    policy.push_str("p, nurse, hospital.visits, approve\n");
    std::fs::write(policies.join("policy.csv"), policy).unwrap();
    let mut users = String::new();
    for (name, role) in [
        ("analyst", "analyst"),
        ("owner", "owner"),
        ("nurse", "nurse"),
    ] {
        let hash = airlock::auth::hash_password(name).unwrap();
        users.push_str(&format!(
            "[users.{name}]\npassword_hash = \"{hash}\"\nroles = [\"{role}\"]\n\n"
        ));
    }
    std::fs::write(dir.join("users.toml"), users).unwrap();
    let mut config = demo_config();
    config.policy_dir = policies;
    config.users_file = dir.join("users.toml");
    config.state_dir = dir.join("state");
    config.console_listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

/// One HTTP/1.1 response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The session cookie this response sets, as `name=value`.
    fn cookie(&self) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, v)| {
                v.starts_with("airlock_console=")
                    .then(|| v.split(';').next().unwrap().to_string())
            })
    }

    /// The CSRF token of the page's forms.
    fn token(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a form with a token")
            + 19;
        self.body[at..].split('"').next().unwrap().to_string()
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    extra: &[(&str, &str)],
    form: Option<&str>,
) -> Response {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(s, addr, method, path, cookie, extra, form).await
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    extra: &[(&str, &str)],
    form: Option<&str>,
) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = form.unwrap_or("");
    if form.is_some() {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify after the response: keep what came.
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Signs in through the form; returns the session cookie and the signed-in token.
async fn sign_in(addr: SocketAddr, user: &str) -> (String, String) {
    let form = http(addr, "GET", "/login", None, &[], None).await;
    assert_eq!(form.status, 200);
    let anon = form
        .cookie()
        .expect("an anonymous session for the form's token");
    let body = format!("csrf={}&user={user}&password={user}", form.token());
    let r = http(addr, "POST", "/login", Some(&anon), &[], Some(&body)).await;
    assert_eq!(r.status, 303, "{r:?}");
    let cookie = r.cookie().expect("a new session on sign-in");
    assert_ne!(cookie, anon, "signing in replaces the session id");
    let page = http(addr, "GET", "/mine", Some(&cookie), &[], None).await;
    assert_eq!(page.status, 200);
    (cookie, page.token())
}

async fn pending(addr: SocketAddr, user: &str, sql: &str) -> String {
    let mut c = Client::connect(&format!("grpc://{addr}"), user, user, None)
        .await
        .unwrap();
    let mut out = Vec::new();
    let e: Error = airlock::client::run_sql(&mut c, sql, airlock::client::Format::Csv, &mut out)
        .await
        .unwrap_err();
    assert_eq!(e.reason_code().as_deref(), Some("APPROVAL_PENDING"), "{e}");
    let text = e.to_string();
    let rest = text.split("request ").nth(1).unwrap();
    rest.split(':').next().unwrap().to_string()
}

#[tokio::test]
async fn owner_decides_in_the_browser_and_analysts_see_only_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(config(dir.path())).await;
    let web = server.console_addr.expect("console is served");

    // Signed out: pages send you to sign in; headers protect every page.
    let r = http(web, "GET", "/requests", None, &[], None).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/login")));
    let login = http(web, "GET", "/login", None, &[], None).await;
    let csp = login.header("content-security-policy").unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(login.header("x-frame-options"), Some("DENY"));
    let set = login.header("set-cookie").unwrap().to_ascii_lowercase();
    assert!(
        set.contains("httponly") && set.contains("samesite=strict"),
        "{set}"
    );
    assert!(!set.contains("secure"), "no TLS, no Secure flag: {set}");
    let htmx = http(web, "GET", "/assets/htmx.min.js", None, &[], None).await;
    assert_eq!(htmx.status, 200);
    assert!(htmx.body.contains("htmx"));

    // A wrong password is refused.
    let anon = login.cookie().unwrap();
    let bad = format!("csrf={}&user=owner&password=nope", login.token());
    let r = http(web, "POST", "/login", Some(&anon), &[], Some(&bad)).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("wrong password"));

    let id = pending(server.addr, "analyst", RAW).await;
    let visits_id = pending(server.addr, "analyst", VISITS).await;

    // The owner sees the request in the list and its detail page.
    let (owner, owner_token) = sign_in(web, "owner").await;
    let list = http(web, "GET", "/requests/live", Some(&owner), &[], None).await;
    assert_eq!(list.status, 200);
    assert!(
        list.body.contains(&id) && list.body.contains(&visits_id),
        "{}",
        list.body
    );
    let detail = http(
        web,
        "GET",
        &format!("/requests/{id}"),
        Some(&owner),
        &[],
        None,
    )
    .await;
    assert_eq!(detail.status, 200);
    assert!(
        detail
            .body
            .contains("SELECT * FROM hospital.patients WHERE age &#62; 88")
    );
    assert!(detail.body.contains("id=\"approve-form\""));

    // The analyst: their own requests, 403 on owner pages and on a direct approve.
    let (analyst, analyst_token) = sign_in(web, "analyst").await;
    let mine = http(web, "GET", "/mine/live", Some(&analyst), &[], None).await;
    assert!(mine.body.contains(&id));
    for page in [
        "/requests",
        "/activity",
        "/policy",
        &format!("/requests/{id}"),
    ] {
        let r = http(web, "GET", page, Some(&analyst), &[], None).await;
        assert_eq!(r.status, 403, "{page}");
    }
    let approve = format!("/requests/{id}/approve");
    let form = format!("csrf={analyst_token}&max_rows=&expires_in_secs=86400");
    let r = http(web, "POST", &approve, Some(&analyst), &[], Some(&form)).await;
    assert_eq!(r.status, 403);
    let access = http(web, "GET", "/access", Some(&analyst), &[], None).await;
    assert!(access.body.contains("hospital.patients") && !access.body.contains("hospital.staff"));

    // Forged POSTs: without the token, with another session's token, from another site.
    let forms = [
        "max_rows=&expires_in_secs=86400".to_string(),
        format!("csrf={analyst_token}&max_rows=&expires_in_secs=86400"),
    ];
    for form in &forms {
        let r = http(web, "POST", &approve, Some(&owner), &[], Some(form)).await;
        assert_eq!(r.status, 403, "{form}");
    }
    let ok_form = format!("csrf={owner_token}&max_rows=2&expires_in_secs=3600");
    let cross = [
        ("Sec-Fetch-Site", "cross-site"),
        ("Origin", "https://evil.example"),
    ];
    let r = http(web, "POST", &approve, Some(&owner), &cross, Some(&ok_form)).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        server.airlock.approvals.get(&id).await.unwrap().status,
        airlock::approval::Status::Pending
    );

    // The real decision.
    let same_site = [
        ("Sec-Fetch-Site", "same-origin"),
        ("Origin", &format!("http://{web}")),
    ];
    let r = http(
        web,
        "POST",
        &approve,
        Some(&owner),
        &same_site,
        Some(&ok_form),
    )
    .await;
    assert_eq!(
        (r.status, r.header("location")),
        (303, Some(&*format!("/requests/{id}")))
    );
    assert!(matches!(
        server.airlock.approvals.get(&id).await.unwrap().status,
        airlock::approval::Status::Approved {
            max_rows: Some(2),
            reusable: false,
            ..
        }
    ));
    let deny = format!("csrf={owner_token}&reason=not+today");
    let r = http(
        web,
        "POST",
        &format!("/requests/{visits_id}/deny"),
        Some(&owner),
        &[],
        Some(&deny),
    )
    .await;
    assert_eq!(r.status, 303);
    let mine = http(web, "GET", "/mine/live", Some(&analyst), &[], None).await;
    assert!(
        mine.body.contains("not today") && mine.body.contains("at most 2 rows"),
        "{}",
        mine.body
    );

    // Activity: the chain, the decisions, the filters.
    let activity = http(
        web,
        "GET",
        "/activity?decision=approved",
        Some(&owner),
        &[],
        None,
    )
    .await;
    assert_eq!(activity.status, 200);
    assert!(activity.body.contains("chain intact"), "{}", activity.body);
    assert!(activity.body.contains(&id) && !activity.body.contains("not today"));
    assert!(activity.body.contains("<svg id=\"chart\""));
    let policy = http(web, "GET", "/policy", Some(&owner), &[], None).await;
    assert!(policy.body.contains("patient_id") && policy.body.contains("hospital.staff"));

    // Signing out ends the session.
    let out = format!("csrf={owner_token}");
    let r = http(web, "POST", "/logout", Some(&owner), &[], Some(&out)).await;
    assert_eq!(r.status, 303);
    let r = http(web, "GET", "/requests", Some(&owner), &[], None).await;
    assert_eq!(r.status, 303);
}

#[tokio::test]
async fn an_owner_sees_only_what_touches_their_tables() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(config(dir.path())).await;
    let web = server.console_addr.unwrap();
    let patients = pending(server.addr, "analyst", RAW).await;
    let visits = pending(server.addr, "analyst", VISITS).await;
    let (nurse, _) = sign_in(web, "nurse").await;
    let list = http(web, "GET", "/requests/live", Some(&nurse), &[], None).await;
    assert_eq!(list.status, 200);
    assert!(list.body.contains(&visits) && !list.body.contains(&patients));
    let r = http(
        web,
        "GET",
        &format!("/requests/{patients}"),
        Some(&nurse),
        &[],
        None,
    )
    .await;
    assert_eq!(
        r.status, 404,
        "another owner's request does not exist for you"
    );
    let policy = http(web, "GET", "/policy", Some(&nurse), &[], None).await;
    assert!(policy.body.contains("hospital.visits") && !policy.body.contains("hospital.patients"));
    let activity = http(web, "GET", "/activity", Some(&nurse), &[], None).await;
    assert!(activity.body.contains(&visits) || activity.body.contains("hospital.visits"));
    assert!(
        !activity.body.contains("hospital.patients"),
        "{}",
        activity.body
    );
}

#[tokio::test]
async fn under_tls_the_console_serves_https_with_a_secure_cookie() {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("server.crt"), key.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("server.key"),
        key.signing_key.serialize_pem(),
    )
    .unwrap();
    let mut config = config(dir.path());
    config.tls = Some(airlock::config::TlsFiles {
        cert: dir.path().join("server.crt"),
        key: dir.path().join("server.key"),
        client_ca: None,
    });
    let server = start_with(config).await;
    let web = server.console_addr.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(key.cert.der().to_vec()))
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(web).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS with the Flight endpoint's certificate");
    let r = exchange(tls, web, "GET", "/login", None, &[], None).await;
    assert_eq!(r.status, 200);
    let set = r.header("set-cookie").unwrap().to_ascii_lowercase();
    assert!(set.contains("secure") && set.contains("httponly"), "{set}");
    assert!(r.header("strict-transport-security").is_some());

    // Plain HTTP gets no page.
    let mut plain = tokio::net::TcpStream::connect(web).await.unwrap();
    plain
        .write_all(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = plain.read_to_end(&mut raw).await;
    assert!(!String::from_utf8_lossy(&raw).contains("200 OK"));
}

#[tokio::test]
async fn a_busy_console_address_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config(dir.path());
    config.console_listen = Some(taken.local_addr().unwrap());
    let err = airlock::server::Airlock::build(config)
        .await
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("console: cannot listen on"),
        "{err}"
    );
}
