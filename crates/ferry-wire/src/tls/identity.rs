//! A node's certificate (self-signed, or issued by the cluster CA) around its Ed25519 key, and
//! the cluster CA.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivatePkcs8KeyDer, UnixTime};
use time::{Duration, OffsetDateTime};

use super::der::{common_name, ed25519_key, ED25519_PKCS8_PREFIX};
use super::verify::{PeerVerifier, Refusal, Trust};
use crate::WireError;

/// How long certificates made here are valid.
const VALIDITY: Duration = Duration::days(3650);
/// Backdating, for peers whose clock is a little behind.
const BACKDATE: Duration = Duration::hours(1);

/// This node's TLS identity: its Ed25519 key and a certificate for it.
pub struct Identity {
    name: String,
    public: [u8; 32],
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("key", &super::key_hex(&self.public))
            .finish()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            public: self.public,
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// An identity with a self-signed certificate, for peers that pin its key.
    pub fn self_signed(seed: &[u8; 32], name: &str) -> Result<Identity, WireError> {
        let (key, der) = ed25519_key_pair(seed)?;
        let (from, until) = validity();
        let cert = leaf_params(name, from, until)?.self_signed(&key).map_err(cert_err("node"))?;
        Ok(Identity::from_parts(name, &key, cert.der().clone(), der))
    }

    /// An identity with a certificate issued by the cluster CA, for peers that trust the CA.
    pub fn issued(seed: &[u8; 32], name: &str, ca: &ClusterCa) -> Result<Identity, WireError> {
        let (from, until) = validity();
        Identity::issued_for(seed, name, ca, from, until)
    }

    /// [`Identity::issued`] with a chosen validity period (tests make expired ones).
    pub(crate) fn issued_for(
        seed: &[u8; 32],
        name: &str,
        ca: &ClusterCa,
        from: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Identity, WireError> {
        let (key, der) = ed25519_key_pair(seed)?;
        let cert =
            leaf_params(name, from, until)?.signed_by(&key, &ca.signer, &ca.key).map_err(cert_err("node"))?;
        Ok(Identity::from_parts(name, &key, cert.der().clone(), der))
    }

    /// An identity from a certificate issued elsewhere (by `ferry node ca issue`, with the CA
    /// key that this node does not hold) for the key of `seed`. `cert` is PEM or DER. Refused
    /// unless the certificate holds exactly this node's Ed25519 public key: a certificate for
    /// another key would make every handshake fail, later and less clearly.
    ///
    /// Neither the issuer nor the validity period is checked here: peers check them against
    /// the CA they trust.
    pub fn from_cert(seed: &[u8; 32], cert: &[u8]) -> Result<Identity, WireError> {
        let (key, der) = ed25519_key_pair(seed)?;
        let cert = cert_from_pem_or_der(cert)?;
        let parsed = webpki::EndEntityCert::try_from(&cert)
            .map_err(|_| bad_cert("it does not parse as an X.509 certificate"))?;
        let Some(in_cert) = ed25519_key(parsed.subject_public_key_info().as_ref()) else {
            return Err(bad_cert("it holds no Ed25519 key (ferry nodes use their Ed25519 node key)"));
        };
        let mut public = [0u8; 32];
        public.copy_from_slice(key.public_key_raw());
        if in_cert != public {
            return Err(WireError::NotThisNodesCertificate {
                cert_key: super::key_hex(&in_cert),
                node_key: super::key_hex(&public),
            });
        }
        let name = parsed
            .valid_dns_names()
            .next()
            .map(str::to_owned)
            .or_else(|| common_name(parsed.subject()))
            .unwrap_or_default();
        Ok(Identity { name, public, cert, key: der })
    }

    fn from_parts(
        name: &str,
        key: &KeyPair,
        cert: CertificateDer<'static>,
        der: PrivatePkcs8KeyDer<'static>,
    ) -> Self {
        let mut public = [0u8; 32];
        public.copy_from_slice(key.public_key_raw());
        Identity { name: name.to_owned(), public, cert, key: der }
    }

    /// The Ed25519 public key: what peers pin.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// The node name in the certificate.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// The common name of the certificate's issuer, when another key issued it (`None` for a
    /// self-signed certificate).
    pub fn issuer(&self) -> Option<String> {
        let parsed = webpki::EndEntityCert::try_from(&self.cert).ok()?;
        if parsed.issuer() == parsed.subject() {
            return None;
        }
        Some(common_name(parsed.issuer()).unwrap_or_default())
    }

    /// The certificate as PEM (what `ferry node ca issue` writes to `keys/node-cert.pem`).
    pub fn cert_pem(&self) -> String {
        pem_block("CERTIFICATE", &self.cert)
    }

    pub(crate) fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    pub(crate) fn key(&self) -> PrivatePkcs8KeyDer<'static> {
        self.key.clone_key()
    }
}

/// The cluster's certificate authority: issues node certificates that every node trusting the
/// CA admits, so that a new node needs no pinning on every other one.
pub struct ClusterCa {
    name: String,
    key: KeyPair,
    /// The CA as rcgen needs it to sign: same name and key as `cert`.
    signer: rcgen::Certificate,
    /// The CA certificate peers trust.
    cert: CertificateDer<'static>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new CA with a fresh Ed25519 key, valid ten years.
    pub fn generate(name: &str) -> Result<ClusterCa, WireError> {
        check_ca_name(name)?;
        let key = KeyPair::generate_for(&PKCS_ED25519).map_err(cert_err("cluster CA"))?;
        let (from, until) = validity();
        let signer = ca_params(name, from, until).self_signed(&key).map_err(cert_err("cluster CA"))?;
        let cert = signer.der().clone();
        Ok(ClusterCa { name: name.to_owned(), key, signer, cert })
    }

    /// The CA's name (its certificate's common name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CA certificate (DER): what nodes put in [`Trust::ca`](super::Trust::ca).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// The CA certificate alone as PEM: public, what nodes that trust the CA need.
    pub fn cert_pem(&self) -> String {
        pem_block("CERTIFICATE", &self.cert)
    }

    /// Certificate and private key as PEM. Holds the secret key: store it readable by root only.
    pub fn to_pem(&self) -> String {
        let mut out = pem_block("CERTIFICATE", &self.cert);
        out.push_str(&self.key.serialize_pem());
        out
    }

    /// Reads what [`ClusterCa::to_pem`] wrote.
    pub fn from_pem(pem: &str) -> Result<ClusterCa, WireError> {
        let cert =
            CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| bad_ca("no CERTIFICATE block"))?;
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| bad_ca("no PRIVATE KEY block (PKCS#8)"))?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ED25519)
            .map_err(|_| bad_ca("the private key is not an Ed25519 key"))?;
        let parsed =
            webpki::EndEntityCert::try_from(&cert).map_err(|_| bad_ca("the certificate does not parse"))?;
        if parsed.subject_public_key_info().as_ref() != key.public_key_der() {
            return Err(bad_ca("the certificate is not for the private key beside it"));
        }
        let name =
            common_name(parsed.subject()).ok_or_else(|| bad_ca("the certificate has no common name"))?;
        // rcgen signs with a certificate object: rebuild it. Issued certificates name the CA by
        // its subject and key, so those must come out identical.
        let (from, until) = validity();
        let signer = ca_params(&name, from, until).self_signed(&key).map_err(cert_err("cluster CA"))?;
        let rebuilt =
            webpki::EndEntityCert::try_from(signer.der()).map_err(|_| bad_ca("rebuilt CA does not parse"))?;
        if rebuilt.subject() != parsed.subject() {
            return Err(bad_ca("its subject is not one ferry writes"));
        }
        Ok(ClusterCa { name, key, signer, cert })
    }
}

/// A cluster CA's certificate as a node that trusts it holds it (without the CA's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCert {
    /// The certificate (DER): what goes in [`Trust::ca`](super::Trust::ca).
    pub der: Vec<u8>,
    /// Its subject's common name, for messages.
    pub name: String,
}

impl CaCert {
    /// Reads a CA certificate, PEM (the first CERTIFICATE block: the file `ClusterCa::to_pem`
    /// or `ClusterCa::cert_pem` wrote) or DER, and checks that it can serve as trust anchor.
    pub fn parse(bytes: &[u8]) -> Result<CaCert, WireError> {
        let cert = cert_from_pem_or_der(bytes).map_err(|_| bad_ca("no CERTIFICATE block"))?;
        let anchor = webpki::anchor_from_trusted_cert(&cert)
            .map_err(|_| bad_ca("the CA certificate does not parse"))?;
        let name = common_name(anchor.subject.as_ref()).unwrap_or_default();
        Ok(CaCert { der: cert.to_vec(), name })
    }

    /// Whether peers that trust this CA admit `identity`: its certificate was issued by this
    /// CA and is valid now. For a node to check its own certificate before it is refused.
    pub fn check_issued(&self, identity: &Identity) -> Result<(), Refusal> {
        let verifier = PeerVerifier::new(Trust { pinned: vec![], ca: Some(self.der.clone()) })
            .map_err(|_| Refusal::BadCertificate)?;
        verifier.admit(&identity.cert, UnixTime::now(), webpki::KeyUsage::server_auth())
    }
}

/// One certificate from PEM (the first CERTIFICATE block) or DER.
fn cert_from_pem_or_der(bytes: &[u8]) -> Result<CertificateDer<'static>, WireError> {
    if bytes.first() == Some(&0x30) {
        return Ok(CertificateDer::from(bytes.to_vec()));
    }
    CertificateDer::from_pem_slice(bytes).map_err(|_| bad_cert("no CERTIFICATE block (PEM) and not DER"))
}

#[cfg(test)]
impl ClusterCa {
    /// Signs any certificate (tests make ones ferry would not).
    pub(crate) fn sign_for_tests(&self, params: CertificateParams, key: &KeyPair) -> rcgen::Certificate {
        #[allow(clippy::unwrap_used)]
        params.signed_by(key, &self.signer, &self.key).unwrap()
    }
}

/// The Ed25519 key pair of `seed`, and its PKCS#8 encoding (for rustls).
fn ed25519_key_pair(seed: &[u8; 32]) -> Result<(KeyPair, PrivatePkcs8KeyDer<'static>), WireError> {
    let mut der = Vec::with_capacity(ED25519_PKCS8_PREFIX.len() + 32);
    der.extend_from_slice(&ED25519_PKCS8_PREFIX);
    der.extend_from_slice(seed);
    let der = PrivatePkcs8KeyDer::from(der);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519).map_err(cert_err("node key"))?;
    Ok((key, der))
}

fn validity() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - BACKDATE, now + VALIDITY)
}

/// A node certificate: SAN and CN = `name`, for TLS clients and servers.
fn leaf_params(
    name: &str,
    from: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<CertificateParams, WireError> {
    check_node_name(name)?;
    let mut p = CertificateParams::new(vec![name.to_owned()]).map_err(|_| bad_name(name))?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = from;
    p.not_after = until;
    Ok(p)
}

/// The CA certificate: CN = `name`, may sign node certificates only (path length 0).
fn ca_params(name: &str, from: OffsetDateTime, until: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = from;
    p.not_after = until;
    p
}

/// Node names go into certificates as DNS names.
fn check_node_name(name: &str) -> Result<(), WireError> {
    match DnsName::try_from(name) {
        Ok(_) => Ok(()),
        Err(_) => Err(bad_name(name)),
    }
}

fn check_ca_name(name: &str) -> Result<(), WireError> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(WireError::BadCaName { name: name.to_owned() });
    }
    Ok(())
}

fn bad_name(name: &str) -> WireError {
    WireError::BadNodeName { name: name.to_owned() }
}

fn bad_cert(why: &'static str) -> WireError {
    WireError::BadNodeCertificate { why }
}

fn bad_ca(why: &'static str) -> WireError {
    WireError::BadCa { why }
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> WireError {
    move |source| WireError::Certificate { what, source }
}

/// One PEM block, 64 columns.
fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
