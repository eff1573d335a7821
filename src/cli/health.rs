//! `bus health`: exits 0 when the server is ready to take events (`GET /readyz` answers
//! `200`), 1 when it is not, cannot be reached or does not answer in time. It is the
//! Docker image's health check, so it needs no curl or wget.
//!
//! It finds the server from the server's own settings, read from the same flags and
//! `BUS_*` variables as `bus server`: the listening address (`--addr`/`BUS_ADDR`, the
//! loopback address when the server listens on all interfaces) and, with
//! `--tls-cert`/`BUS_TLS_CERT`, HTTPS. A container's check thus follows a changed port or
//! TLS without being edited. `--host` checks a server named explicitly instead (it does not
//! read `BUS_HOST`, which in a container names where the client tools go, not the server
//! beside them).
//!
//! With TLS, the certificate is verified as a client verifies it: its chain against the
//! system's authorities and `--ca-cert`/`BUS_CA_CERT`, its validity period, and a name.
//! The connection goes to the listening (loopback) address, because a certificate is
//! usually for a public name (`bus.example.com`) that inside a container resolves to a
//! load balancer, or nowhere. So the check asks for (SNI) and verifies a name the server's
//! certificate file holds, with that name pinned to the address probed instead of looked
//! up: the address itself if the certificate names it, else the certificate's DNS names
//! in order (a wildcard `*.example.com` is asked for as `health.example.com`). It fails,
//! as clients would, when the certificate the server presents has expired, its chain is
//! not trusted or is incomplete, or it is not for that name. It cannot know under which
//! name clients reach the server; `--host https://bus.example.com` checks that from where
//! clients are.
//!
//! The server it finds is on this machine: that check never goes through a proxy
//! (`HTTPS_PROXY` and the like); a `--host` check uses them as the other client commands do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::parse_duration;
use crate::client::Client;
use crate::duration::format_go_duration;

/// The server's default `--addr` (see `ServerConfig::addr`).
const SERVER_DEFAULT_ADDR: &str = "0.0.0.0:2021";

/// How a wildcard certificate's name is asked for: any label would do.
const WILDCARD_LABEL: &str = "health";

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The address the server listens on, as `bus server --addr` takes it (`:2021` and
    /// `0.0.0.0:2021` are checked on the loopback address).
    #[arg(long, env = "BUS_ADDR", default_value = SERVER_DEFAULT_ADDR)]
    pub addr: String,
    /// The server's certificate chain (`bus server --tls-cert`): the check speaks HTTPS
    /// and verifies the server's certificate for a name this one holds.
    #[arg(long, env = "BUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// CA certificate (PEM) to trust, besides the system's, for a certificate that a
    /// private CA signed (or a self-signed one).
    #[arg(long, env = "BUS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Check this server (`http://host:port`, `https://host:port`) instead of the one
    /// that --addr and --tls-cert describe.
    #[arg(long)]
    pub host: Option<String>,
    /// How long the server has to answer.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Returns (exit 0) if the server is ready; any error (exit 1, the reason on standard
/// error) if not.
pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    check(&args).await
}

/// Where the check goes: the URL, and the address its host name is pinned to.
#[derive(Debug, PartialEq, Eq)]
struct Probe {
    url: String,
    pin: Option<(String, SocketAddr)>,
}

async fn check(args: &HealthArgs) -> anyhow::Result<()> {
    let probe = match &args.host {
        Some(host) => Probe {
            url: format!("{}/readyz", Client::new(host)?.host()),
            pin: None,
        },
        None => probe(&args.addr, args.tls_cert.as_deref()).await?,
    };
    let mut builder = reqwest::Client::builder()
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    if args.host.is_none() {
        builder = builder.no_proxy();
    }
    if let Some(path) = &args.ca_cert {
        let pem =
            std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display()))?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|roots| !roots.is_empty())
            .with_context(|| format!("--ca-cert {} holds no PEM certificate", path.display()))?;
        builder = builder.tls_certs_merge(roots);
    }
    if let Some((name, addr)) = &probe.pin {
        builder = builder.resolve(name, *addr);
    }
    let http = builder.build().context("cannot set up HTTP")?;
    let server = match &probe.pin {
        Some((_, addr)) => format!("{} (on {addr})", probe.url),
        None => probe.url.clone(),
    };
    let response = http.get(&probe.url).send().await.map_err(|e| {
        if e.is_timeout() {
            anyhow!(
                "the bus server at {server} did not answer within {}",
                format_go_duration(args.timeout)
            )
        } else {
            anyhow!("cannot reach the bus server at {server}: {}", innermost(&e))
        }
    })?;
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    bail!(
        "the bus server at {server} is not ready ({status}): {}",
        text.trim()
    )
}

/// reqwest's outer message is generic; the innermost cause says what happened.
fn innermost(error: &reqwest::Error) -> String {
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = cause.to_string();
        source = cause.source();
    }
    reason
}

/// The server's `/readyz`, from its listening address and certificate.
async fn probe(listen: &str, tls_cert: Option<&Path>) -> anyhow::Result<Probe> {
    let (host, port) = loopback(listen)?;
    let url = |host: &str| match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    let Some(path) = tls_cert else {
        return Ok(Probe {
            url: format!("http://{}/readyz", url(&host)),
            pin: None,
        });
    };
    let name = certificate_name(path, &host)?;
    if name == host {
        return Ok(Probe {
            url: format!("https://{}/readyz", url(&host)),
            pin: None,
        });
    }
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| format!("cannot resolve {host} (from --addr {listen})"))?;
    Ok(Probe {
        url: format!("https://{}/readyz", url(&name)),
        pin: Some((name, addr)),
    })
}

/// The host and port to reach a server listening on `listen` from the same machine
/// (`:2021`, as the server takes it, is all interfaces).
fn loopback(listen: &str) -> anyhow::Result<(String, u16)> {
    let listen = listen.trim();
    let (host, port) = listen
        .rsplit_once(':')
        .with_context(|| format!("--addr {listen:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&port| port != 0)
        .with_context(|| format!("--addr {listen:?} has no port to check"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = match host.parse::<IpAddr>() {
        Err(_) if host.is_empty() => Ipv4Addr::LOCALHOST.to_string(),
        Err(_) => host.to_owned(),
        Ok(ip) if ip.is_unspecified() && ip.is_ipv4() => Ipv4Addr::LOCALHOST.to_string(),
        Ok(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.to_string(),
        Ok(ip) => ip.to_string(),
    };
    Ok((host, port))
}

/// The name to ask the server at `host` for: `host` itself if the certificate (the first
/// in the file at `path`) is valid for it, else the first of its DNS names it is valid
/// for, as rustls decides.
fn certificate_name(path: &Path, host: &str) -> anyhow::Result<String> {
    let described = || format!("--tls-cert {}", path.display());
    let leaf = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", described()))?
        .next()
        .with_context(|| format!("{} holds no PEM certificate", described()))?
        .with_context(|| format!("reading {}", described()))?;
    let parsed = rustls::server::ParsedCertificate::try_from(&leaf)
        .map_err(|e| anyhow!("{} is not a usable certificate: {e}", described()))?;
    let names = dns_names(&leaf);
    let candidates =
        std::iter::once(host.to_owned()).chain(names.iter().map(
            |name| match name.strip_prefix("*.") {
                Some(parent) => format!("{WILDCARD_LABEL}.{parent}"),
                None => name.clone(),
            },
        ));
    for candidate in candidates {
        let Ok(server_name) = ServerName::try_from(candidate.as_str()) else {
            continue;
        };
        if rustls::client::verify_server_name(&parsed, &server_name).is_ok() {
            return Ok(candidate);
        }
    }
    bail!(
        "{} is for neither {host} nor a DNS name (it names {}); check with --host instead",
        described(),
        if names.is_empty() {
            "no DNS name".to_owned()
        } else {
            names.join(", ")
        }
    )
}

/// The DNS names of a DER certificate's subjectAltName extension, in order (none if it
/// has none, or is not the DER expected: rustls, which verifies the names, has the last
/// word).
fn dns_names(certificate: &[u8]) -> Vec<String> {
    /// One DER element: its tag, its contents, and what follows it.
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let len = rest[..count]
                .iter()
                .fold(0usize, |len, &b| len << 8 | usize::from(b));
            rest = &rest[count..];
            len
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    const EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT, in TBSCertificate
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11]; // OID 2.5.29.17
    const BOOLEAN: u8 = 0x01; // an extension's `critical`
    const DNS_NAME: u8 = 0x82; // GeneralName [2] IA5String
    let mut names = Vec::new();
    let mut find = || -> Option<()> {
        let (_, certificate, _) = element(certificate)?;
        let (_, mut tbs, _) = element(certificate)?;
        while let Some((tag, value, rest)) = element(tbs) {
            tbs = rest;
            if tag != EXTENSIONS {
                continue;
            }
            let (_, mut extensions, _) = element(value)?;
            while let Some((_, extension, rest)) = element(extensions) {
                extensions = rest;
                let (_, id, fields) = element(extension)?;
                if id != SUBJECT_ALT_NAME {
                    continue;
                }
                // `critical` (if present), then the OCTET STRING holding GeneralNames.
                let (tag, value, rest) = element(fields)?;
                let value = if tag == BOOLEAN {
                    element(rest)?.1
                } else {
                    value
                };
                let (_, mut general_names, _) = element(value)?;
                while let Some((tag, name, rest)) = element(general_names) {
                    general_names = rest;
                    if tag == DNS_NAME {
                        if let Ok(name) = std::str::from_utf8(name) {
                            names.push(name.to_owned());
                        }
                    }
                }
            }
        }
        Some(())
    };
    let _ = find();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    fn der(name: &str) -> Vec<u8> {
        CertificateDer::from_pem_file(fixture(name))
            .unwrap()
            .to_vec()
    }

    #[test]
    fn the_loopback_address_of_a_listening_address() {
        for (listen, expected) in [
            (":2021", ("127.0.0.1", 2021)),
            ("0.0.0.0:2021", ("127.0.0.1", 2021)),
            ("[::]:8443", ("::1", 8443)),
            ("10.1.2.3:80", ("10.1.2.3", 80)),
            ("[fd00::7]:80", ("fd00::7", 80)),
            ("localhost:2021", ("localhost", 2021)),
        ] {
            let (host, port) = loopback(listen).unwrap();
            assert_eq!((host.as_str(), port), expected, "{listen}");
        }
        for bad in ["", "2021", "0.0.0.0:", "0.0.0.0:0", "host:http"] {
            assert!(loopback(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_dns_names_of_a_certificate() {
        assert_eq!(dns_names(&der("cert.pem")), ["localhost"]);
        assert_eq!(dns_names(&der("public-name-cert.pem")), ["bus.example.com"]);
        // A CA certificate without the extension, and garbage.
        assert!(dns_names(&der("ca.pem")).is_empty());
        assert!(dns_names(b"\x30\x82\xff").is_empty());
    }

    #[test]
    fn the_name_asked_for_is_one_the_certificate_is_valid_for() {
        let localhost = fixture("cert.pem"); // DNS:localhost, IP:127.0.0.1
        assert_eq!(
            certificate_name(&localhost, "127.0.0.1").unwrap(),
            "127.0.0.1"
        );
        assert_eq!(certificate_name(&localhost, "::1").unwrap(), "localhost");
        let public = fixture("public-name-cert.pem"); // DNS:bus.example.com
        assert_eq!(
            certificate_name(&public, "127.0.0.1").unwrap(),
            "bus.example.com"
        );
        let error = certificate_name(&fixture("ca.pem"), "127.0.0.1").unwrap_err();
        assert!(error.to_string().contains("no DNS name"), "{error}");
    }

    #[tokio::test]
    async fn probes_follow_the_address_and_the_certificate() {
        assert_eq!(
            probe(":2021", None).await.unwrap(),
            Probe {
                url: "http://127.0.0.1:2021/readyz".into(),
                pin: None
            }
        );
        assert_eq!(
            probe("[::]:2021", None).await.unwrap().url,
            "http://[::1]:2021/readyz"
        );
        let public = fixture("public-name-cert.pem");
        assert_eq!(
            probe("0.0.0.0:8443", Some(&public)).await.unwrap(),
            Probe {
                url: "https://bus.example.com:8443/readyz".into(),
                pin: Some(("bus.example.com".into(), "127.0.0.1:8443".parse().unwrap())),
            }
        );
    }
}
