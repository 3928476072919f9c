//! Who is admitted: a peer whose Ed25519 key is pinned, or whose certificate the cluster CA
//! issued. One check serves both directions (rustls client and server verifiers).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use super::der::{common_name, ed25519_key};
use super::key_hex;
use crate::WireError;

/// Which peers this node admits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// Ed25519 keys of pinned peers (`ferry node trust`); their certificates are not checked
    /// further: the handshake proves the peer holds the key, and the key is the identity.
    pub pinned: Vec<[u8; 32]>,
    /// The cluster CA's certificate (DER): peers with a certificate it issued (signature and
    /// validity period checked) are admitted too.
    pub ca: Option<Vec<u8>>,
}

/// Why a peer's certificate was refused. Carried through rustls to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The certificate does not parse.
    #[error("its certificate does not parse")]
    BadCertificate,
    /// The certificate holds an RSA, ECDSA or other non-Ed25519 key.
    #[error("its certificate holds no Ed25519 key (ferry nodes use their Ed25519 node key)")]
    NotEd25519,
    /// An Ed25519 key neither pinned nor vouched for by the CA.
    #[error(
        "key {} is not pinned {}: if you trust that node, pin it with `ferry node trust`",
        key_hex(.key),
        .ca
    )]
    Unknown {
        /// The refused key.
        key: [u8; 32],
        /// What the CA check said.
        ca: String,
    },
}

/// The Ed25519 signature scheme only: node keys and the CA key are Ed25519.
static ED25519_ONLY: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[webpki::ring::ED25519],
    mapping: &[(SignatureScheme::ED25519, &[webpki::ring::ED25519])],
};

/// The admission check, as rustls verifier for both sides.
pub(crate) struct PeerVerifier {
    /// Replaceable while the endpoint serves (`Endpoint::set_pinned`): a pin takes effect at
    /// the next handshake.
    pinned: std::sync::RwLock<Vec<[u8; 32]>>,
    ca: Option<CertificateDer<'static>>,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("pinned", &self.pinned.read().map(|p| p.len()).unwrap_or(0))
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

/// The admitted peer's key and name, read from its (already verified) certificate.
pub(crate) fn peer_of(cert: &CertificateDer<'_>) -> Option<([u8; 32], String)> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let key = ed25519_key(parsed.subject_public_key_info().as_ref())?;
    let name = parsed
        .valid_dns_names()
        .next()
        .map(str::to_owned)
        .or_else(|| common_name(parsed.subject()))
        .unwrap_or_default();
    Some((key, name))
}

impl PeerVerifier {
    pub(crate) fn new(trust: Trust) -> Result<PeerVerifier, WireError> {
        let ca = trust.ca.map(CertificateDer::from);
        if let Some(ca) = &ca {
            webpki::anchor_from_trusted_cert(ca)
                .map_err(|_| WireError::BadCa { why: "the CA certificate does not parse" })?;
        }
        Ok(PeerVerifier { pinned: std::sync::RwLock::new(trust.pinned), ca })
    }

    pub(crate) fn set_pinned(&self, keys: Vec<[u8; 32]>) {
        if let Ok(mut p) = self.pinned.write() {
            *p = keys;
        }
    }

    /// Admits `leaf` or says why not.
    pub(crate) fn admit(
        &self,
        leaf: &CertificateDer<'_>,
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Refusal> {
        let parsed = webpki::EndEntityCert::try_from(leaf).map_err(|_| Refusal::BadCertificate)?;
        let key = ed25519_key(parsed.subject_public_key_info().as_ref()).ok_or(Refusal::NotEd25519)?;
        if self.pinned.read().is_ok_and(|p| p.contains(&key)) {
            return Ok(());
        }
        let Some(ca) = &self.ca else {
            return Err(Refusal::Unknown { key, ca: "(and no cluster CA is configured)".into() });
        };
        let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|_| Refusal::BadCertificate)?;
        match parsed.verify_for_usage(ED25519_ONLY.all, &[anchor], &[], now, usage, None, None) {
            Ok(_) => Ok(()),
            Err(e) => Err(Refusal::Unknown { key, ca: ca_outcome(&e) }),
        }
    }

    fn check(
        &self,
        leaf: &CertificateDer<'_>,
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        self.admit(leaf, now, usage).map_err(|r| {
            tracing::debug!(reason = %r, "peer certificate refused");
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
        })
    }
}

/// The CA check's verdict, for [`Refusal::Unknown`].
fn ca_outcome(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => "and not issued by the cluster CA".into(),
        webpki::Error::CertExpired { .. } => "and its certificate from the cluster CA has expired".into(),
        webpki::Error::CertNotValidYet { .. } => {
            "and its certificate from the cluster CA is not valid yet (check both clocks)".into()
        }
        other => format!("and its certificate does not verify against the cluster CA ({other:?})"),
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOfferedOrEnabled))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ED25519_ONLY)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ED25519_ONLY.supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    /// The server name is ignored: the key is the identity.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, now, webpki::KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOfferedOrEnabled))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ED25519_ONLY)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ED25519_ONLY.supported_schemes()
    }
}
