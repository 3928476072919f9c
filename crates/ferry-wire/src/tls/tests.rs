//! Two endpoints on loopback, in every admission case.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use time::OffsetDateTime;

use super::verify::PeerVerifier;
use super::*;
use crate::frame::{read_frame, recv, send, write_frame, DEFAULT_CAP};
use crate::WireError;

const T: Duration = Duration::from_secs(10);

type Side = Result<(TlsStream, Peer), WireError>;

fn node(n: u8, name: &str) -> Identity {
    Identity::self_signed(&[n; 32], name).unwrap()
}

fn pins(keys: &[&Identity]) -> Trust {
    Trust { pinned: keys.iter().map(|i| i.public_key()).collect(), ca: None }
}

fn ca_trust(ca: &ClusterCa) -> Trust {
    Trust { pinned: vec![], ca: Some(ca.cert_der().to_vec()) }
}

/// Server accepts one connection on a thread; the client connects. Returns (client, server).
fn run(server: (&Identity, Trust), client: (&Identity, Trust)) -> (Side, Side) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let s = Endpoint::new(server.0, server.1).unwrap();
    let c = Endpoint::new(client.0, client.1).unwrap();
    let server = thread::spawn(move || s.accept(listener.accept().unwrap().0));
    let client = c.connect(addr, T);
    (client, server.join().unwrap())
}

#[test]
fn pinned_peers_connect_both_ways_and_exchange_frames() {
    let a = node(1, "node-a");
    let b = node(2, "node-b");
    for (srv, cli) in [(&a, &b), (&b, &a)] {
        let (client, server) = run((srv, pins(&[cli])), (cli, pins(&[srv])));
        let (mut cs, cp) = client.unwrap();
        let (mut ss, sp) = server.unwrap();
        assert_eq!(cp, Peer { key: srv.public_key(), name: srv.name().into() });
        assert_eq!(sp, Peer { key: cli.public_key(), name: cli.name().into() });
        assert_eq!(cs.peer(), &cp);

        let echo = thread::spawn(move || {
            while let Some(f) = read_frame(&mut ss, DEFAULT_CAP).unwrap() {
                write_frame(&mut ss, f.kind + 1, &f.payload).unwrap();
            }
            ss.shutdown().unwrap();
        });
        send(&mut cs, 1, &("hello", 7u32)).unwrap();
        assert_eq!(recv::<(String, u32)>(&mut cs, DEFAULT_CAP).unwrap(), Some((2, ("hello".into(), 7))));
        let big = vec![0x5a; 3 << 20];
        write_frame(&mut cs, 10, &big).unwrap();
        let f = read_frame(&mut cs, DEFAULT_CAP).unwrap().unwrap();
        assert_eq!((f.kind, f.payload.len()), (11, big.len()));
        assert!(f.payload == big);
        cs.shutdown().unwrap();
        assert_eq!(read_frame(&mut cs, DEFAULT_CAP).unwrap(), None, "clean end after the server's shutdown");
        echo.join().unwrap();
    }
}

#[test]
fn a_pin_set_while_serving_takes_effect_at_the_next_handshake() {
    let a = node(1, "node-a");
    let b = node(2, "node-b");
    let s = Arc::new(Endpoint::new(&a, pins(&[])).unwrap());
    let c = Endpoint::new(&b, pins(&[&a])).unwrap();
    let attempt = |s: &Arc<Endpoint>| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = s.clone();
        let server = thread::spawn(move || srv.accept(listener.accept().unwrap().0));
        let client = c.connect(addr, T);
        (client.is_ok(), server.join().unwrap().is_ok())
    };
    assert_eq!(attempt(&s), (false, false), "b is not pinned at a yet");
    s.set_pinned(vec![b.public_key()]);
    assert_eq!(attempt(&s), (true, true), "pinned now, without a new endpoint");
    s.set_pinned(Vec::new());
    assert_eq!(attempt(&s), (false, false), "and unpinned again");
}

#[test]
fn ca_issued_peers_connect_without_pins() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let a = Identity::issued(&[1; 32], "node-a", &ca).unwrap();
    let b = Identity::issued(&[2; 32], "node-b", &ca).unwrap();
    let (client, server) = run((&a, ca_trust(&ca)), (&b, ca_trust(&ca)));
    assert_eq!(client.unwrap().1, Peer { key: a.public_key(), name: "node-a".into() });
    assert_eq!(server.unwrap().1, Peer { key: b.public_key(), name: "node-b".into() });
}

#[test]
fn pinned_and_ca_issued_peers_mix() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let a = Identity::issued(&[1; 32], "node-a", &ca).unwrap();
    let b = node(2, "node-b");
    let trust_a = Trust { pinned: vec![b.public_key()], ca: Some(ca.cert_der().to_vec()) };
    let (client, server) = run((&a, trust_a), (&b, pins(&[&a])));
    assert!(client.is_ok() && server.is_ok());
}

fn assert_refused(e: &WireError, key: &[u8; 32]) {
    assert!(
        matches!(e, WireError::Refused { refusal: Refusal::Unknown { key: k, .. }, .. } if k == key),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&key_hex(key)), "{msg}");
    assert!(msg.contains("pin it with `ferry node trust`"), "{msg}");
}

fn assert_refused_by_peer(e: &WireError) {
    assert!(matches!(e, WireError::RefusedByPeer { .. }), "{e:?}");
    assert!(e.to_string().contains("ferry node trust"), "{e}");
}

#[test]
fn server_refuses_an_unknown_client() {
    let a = node(1, "node-a");
    let b = node(2, "node-b");
    let (client, server) = run((&a, Trust::default()), (&b, pins(&[&a])));
    assert_refused(&server.unwrap_err(), &b.public_key());
    assert_refused_by_peer(&client.unwrap_err());
}

#[test]
fn client_refuses_an_unknown_server() {
    let a = node(1, "node-a");
    let b = node(2, "node-b");
    let (client, server) = run((&a, pins(&[&b])), (&b, Trust::default()));
    assert_refused(&client.unwrap_err(), &a.public_key());
    assert_refused_by_peer(&server.unwrap_err());
}

#[test]
fn the_key_is_checked_not_the_name() {
    let a = node(1, "node-a");
    let impostor = node(3, "node-b");
    let b = node(2, "node-b");
    let (client, server) = run((&a, pins(&[&b])), (&impostor, pins(&[&a])));
    assert_refused(&server.unwrap_err(), &impostor.public_key());
    assert!(client.is_err());
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let ours = ClusterCa::generate("ours").unwrap();
    let theirs = ClusterCa::generate("ours").unwrap();
    let a = Identity::issued(&[1; 32], "node-a", &ours).unwrap();
    let b = Identity::issued(&[2; 32], "node-b", &theirs).unwrap();
    let (client, server) = run((&a, ca_trust(&ours)), (&b, ca_trust(&ours)));
    let e = server.unwrap_err();
    assert_refused(&e, &b.public_key());
    assert!(e.to_string().contains("cluster CA"), "{e}");
    assert_refused_by_peer(&client.unwrap_err());
}

#[test]
fn an_expired_ca_issued_certificate_is_refused() {
    let ca = ClusterCa::generate("cluster").unwrap();
    let now = OffsetDateTime::now_utc();
    let a = Identity::issued(&[1; 32], "node-a", &ca).unwrap();
    let old = Identity::issued_for(
        &[2; 32],
        "node-b",
        &ca,
        now - time::Duration::days(20),
        now - time::Duration::days(10),
    )
    .unwrap();
    let (client, server) = run((&a, ca_trust(&ca)), (&old, ca_trust(&ca)));
    let e = server.unwrap_err();
    assert_refused(&e, &old.public_key());
    assert!(e.to_string().contains("expired"), "{e}");
    assert!(client.is_err());
}

#[test]
fn a_client_without_certificate_is_refused() {
    let a = node(1, "node-a");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let s = Endpoint::new(&a, Trust { pinned: vec![[7; 32]], ca: None }).unwrap();
    let server = thread::spawn(move || s.accept(listener.accept().unwrap().0));
    // A client that trusts the server but has no certificate of its own.
    let verifier = Arc::new(PeerVerifier::new(pins(&[&a])).unwrap());
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("node-a").unwrap()).unwrap();
    let mut stream = StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    stream.sock.set_read_timeout(Some(T)).unwrap();
    let _ = stream.flush();
    assert!(read_frame(&mut stream, 0).is_err(), "the server sends nothing but an alert");
    let e = server.join().unwrap().unwrap_err();
    assert!(matches!(e, WireError::NoClientCert { .. }), "{e:?}");
}

#[test]
fn a_silent_client_cannot_hang_accept() {
    let a = node(1, "node-a");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let s = Endpoint::new(&a, Trust::default()).unwrap().with_handshake_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let e = s.accept(listener.accept().unwrap().0).unwrap_err();
    assert!(matches!(e, WireError::HandshakeTimeout { .. }), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_silent_server_cannot_hang_connect() {
    let a = node(1, "node-a");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let c = Endpoint::new(&a, Trust::default()).unwrap();
    let start = Instant::now();
    let e = c.connect(addr, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, WireError::HandshakeTimeout { .. }), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(listener);
}

#[test]
fn connecting_to_a_closed_port_says_so() {
    let addr: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = Endpoint::new(&node(1, "node-a"), Trust::default()).unwrap();
    let e = c.connect(addr, T).unwrap_err();
    assert!(matches!(e, WireError::Connect { .. }), "{e:?}");
}

#[test]
fn public_key_is_the_ed25519_key_of_the_seed() {
    let seed = [42u8; 32];
    let id = Identity::self_signed(&seed, "node1").unwrap();
    let expected = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
    assert_eq!(id.public_key(), expected);
    assert_eq!(id.name(), "node1");
    let ca = ClusterCa::generate("c").unwrap();
    assert_eq!(Identity::issued(&seed, "node1", &ca).unwrap().public_key(), expected);
    assert!(!format!("{id:?}").contains("PRIVATE"));
}

#[test]
fn node_names_must_be_dns_names() {
    for bad in ["", "has space", "under_score!", "a/b"] {
        let e = Identity::self_signed(&[1; 32], bad).unwrap_err();
        assert!(matches!(e, WireError::BadNodeName { .. }), "{bad:?}: {e:?}");
    }
    assert!(Identity::self_signed(&[1; 32], "node-1.lab").is_ok());
}

#[test]
fn cluster_ca_survives_pem_and_still_issues() {
    let ca = ClusterCa::generate("ferry cluster").unwrap();
    let pem = ca.to_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert!(pem.contains("-----BEGIN PRIVATE KEY-----"));
    let back = ClusterCa::from_pem(&pem).unwrap();
    assert_eq!(back.name(), "ferry cluster");
    assert_eq!(back.cert_der(), ca.cert_der());
    // Issued by the reloaded CA, admitted by nodes that trust the original certificate.
    let a = Identity::issued(&[1; 32], "node-a", &back).unwrap();
    let b = Identity::issued(&[2; 32], "node-b", &ca).unwrap();
    let (client, server) = run((&b, ca_trust(&ca)), (&a, ca_trust(&ca)));
    assert!(client.is_ok() && server.is_ok());
}

#[test]
fn cluster_ca_pem_errors_say_what_is_wrong() {
    let ca = ClusterCa::generate("x").unwrap();
    let other = ClusterCa::generate("x").unwrap();
    let pem = ca.to_pem();
    let cert_only = &pem[..pem.find("-----BEGIN PRIVATE KEY-----").unwrap()];
    let key_only = &pem[cert_only.len()..];
    let mismatched = format!("{cert_only}{}", &other.to_pem()[cert_only.len()..]);
    for (input, says) in [
        ("", "no CERTIFICATE"),
        (cert_only, "no PRIVATE KEY"),
        (key_only, "no CERTIFICATE"),
        (&mismatched, "not for the private key"),
    ] {
        let e = ClusterCa::from_pem(input).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
        assert!(e.to_string().contains("ferry node ca init"), "{e}");
    }
    assert!(matches!(
        Endpoint::new(&node(1, "a"), Trust { pinned: vec![], ca: Some(vec![1, 2, 3]) }),
        Err(WireError::BadCa { .. })
    ));
}

/// A certificate with a P-256 key, self-signed or issued by `ca`.
fn ecdsa_cert(ca: Option<&ClusterCa>) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["node-e".into()]).unwrap();
    p.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = match ca {
        Some(ca) => ca.sign_for_tests(p, &key),
        None => p.self_signed(&key).unwrap(),
    };
    cert.der().to_vec()
}

#[test]
fn non_ed25519_keys_are_refused_even_from_the_ca() {
    let ca = ClusterCa::generate("c").unwrap();
    let v = PeerVerifier::new(ca_trust(&ca)).unwrap();
    let now = rustls::pki_types::UnixTime::now();
    for der in [ecdsa_cert(None), ecdsa_cert(Some(&ca))] {
        let r = v.admit(&der.into(), now, webpki::KeyUsage::client_auth());
        assert_eq!(r, Err(Refusal::NotEd25519));
    }
    let r = v.admit(&vec![0x30, 0x03, 1, 2, 3].into(), now, webpki::KeyUsage::client_auth());
    assert_eq!(r, Err(Refusal::BadCertificate));
}

#[test]
fn a_client_with_an_ecdsa_certificate_is_refused() {
    let a = node(1, "node-a");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let s = Endpoint::new(&a, Trust::default()).unwrap();
    let server = thread::spawn(move || s.accept(listener.accept().unwrap().0));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["node-e".into()]).unwrap().self_signed(&key).unwrap();
    let verifier = Arc::new(PeerVerifier::new(pins(&[&a])).unwrap());
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("node-a").unwrap()).unwrap();
    let mut stream = StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    stream.sock.set_read_timeout(Some(T)).unwrap();
    let _ = stream.flush();
    assert!(read_frame(&mut stream, 0).is_err());
    // The server asks for Ed25519 signatures only: the client has none to give.
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(e, WireError::NoClientCert { .. } | WireError::Refused { refusal: Refusal::NotEd25519, .. }),
        "{e:?}"
    );
}

#[test]
fn an_issued_certificate_is_used_without_the_ca_key() {
    let ca = ClusterCa::generate("ferry cluster").unwrap();
    // What `ferry node ca issue` writes, and what the agent reads back with its seed only.
    let pem = Identity::issued(&[1; 32], "node-a", &ca).unwrap().cert_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
    let a = Identity::from_cert(&[1; 32], pem.as_bytes()).unwrap();
    assert_eq!(a.name(), "node-a");
    assert_eq!(a.public_key(), node(1, "x").public_key());
    let der = Identity::from_cert(&[1; 32], a.cert_der()).unwrap();
    assert_eq!(der.cert_der(), a.cert_der());
    assert_eq!(a.issuer().as_deref(), Some("ferry cluster"));
    assert_eq!(node(1, "node-a").issuer(), None, "self-signed");
    let cert = CaCert::parse(ca.cert_pem().as_bytes()).unwrap();
    assert_eq!(cert.check_issued(&a), Ok(()));
    let other = CaCert::parse(ClusterCa::generate("other").unwrap().cert_der()).unwrap();
    assert!(matches!(other.check_issued(&a), Err(Refusal::Unknown { .. })));
    assert!(cert.check_issued(&node(1, "node-a")).is_err());
    let b = Identity::issued(&[2; 32], "node-b", &ca).unwrap();
    let (client, server) = run((&b, ca_trust(&ca)), (&a, ca_trust(&ca)));
    assert_eq!(client.unwrap().1.name, "node-b");
    assert_eq!(server.unwrap().1, Peer { key: a.public_key(), name: "node-a".into() });
}

#[test]
fn a_certificate_for_another_key_is_refused_as_identity() {
    let ca = ClusterCa::generate("ferry cluster").unwrap();
    let pem = Identity::issued(&[2; 32], "node-b", &ca).unwrap().cert_pem();
    let e = Identity::from_cert(&[1; 32], pem.as_bytes()).unwrap_err();
    assert!(matches!(e, WireError::NotThisNodesCertificate { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&key_hex(&node(2, "x").public_key())), "{msg}");
    assert!(msg.contains(&key_hex(&node(1, "x").public_key())), "{msg}");
    assert!(msg.contains("ferry node ca issue"), "{msg}");
    for (input, says) in [
        (&b""[..], "no CERTIFICATE"),
        (b"hello", "no CERTIFICATE"),
        (&[0x30, 0x03, 1, 2, 3][..], "does not parse"),
    ] {
        let e = Identity::from_cert(&[1; 32], input).unwrap_err();
        assert!(matches!(e, WireError::BadNodeCertificate { .. }), "{e:?}");
        assert!(e.to_string().contains(says), "{e}");
    }
    let e = Identity::from_cert(&[1; 32], &ecdsa_cert(Some(&ca))).unwrap_err();
    assert!(e.to_string().contains("no Ed25519 key"), "{e}");
}

#[test]
fn ca_certificates_are_read_from_pem_or_der() {
    let ca = ClusterCa::generate("ferry cluster").unwrap();
    let public = ca.cert_pem();
    assert!(!public.contains("PRIVATE KEY"), "{public}");
    for input in [public.as_bytes(), ca.to_pem().as_bytes(), ca.cert_der()] {
        let c = CaCert::parse(input).unwrap();
        assert_eq!(c, CaCert { der: ca.cert_der().to_vec(), name: "ferry cluster".into() });
    }
    for bad in [&b""[..], b"-----BEGIN CERTIFICATE-----\n", &[0x30, 0x01, 0x00]] {
        let e = CaCert::parse(bad).unwrap_err();
        assert!(matches!(e, WireError::BadCa { .. }), "{e:?}");
    }
}
