//! Certificates: how a node id is bound to a certificate, making a CA and node certificates
//! (for `highlander certs`), deriving a cluster secret's CA, and loading a node's identity.
//!
//! A node's identity is one DNS subject-alternative name, `node-<id>.highlander.invalid`
//! ([`node_name`]). A DNS name rather than a URI so that rustls' own server-name check, run
//! inside the handshake, refuses a dialed address that answers as another node; `.invalid` is
//! reserved (RFC 6761) and can never be a real host. A certificate is refused if it names no
//! node, more than one, or anything else under `.highlander.invalid` (a wildcard would
//! otherwise match every node).

use crate::config::{ClusterSecret, ConfigError, Identity, QuicConfig};
use highlander_core::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The DNS suffix of every node identity name.
pub const NODE_NAME_SUFFIX: &str = ".highlander.invalid";

/// How long a CA made by [`generate_ca`] is valid by default: ten years.
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;

/// How long a node certificate made by [`issue_node_cert`] is valid by default: one year.
pub const DEFAULT_NODE_VALIDITY_DAYS: u32 = 365;

/// How long a cluster-secret node certificate is valid; the transport renews it after a third
/// of that.
pub(crate) const SECRET_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Certificates start this long before they are made, so a peer whose clock is a little
/// behind still accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// The identity name of node `id`: `node-<id>.highlander.invalid`.
pub fn node_name(id: NodeId) -> String {
    format!("node-{}{NODE_NAME_SUFFIX}", id.0)
}

/// The node a DNS name identifies, if it is an identity name in canonical form (DNS names
/// compare without case, so neither does this).
pub fn node_id_from_name(name: &str) -> Option<NodeId> {
    let lower = name.to_ascii_lowercase();
    let digits = lower.strip_prefix("node-")?.strip_suffix(NODE_NAME_SUFFIX)?;
    // Canonical decimal only, so one id has exactly one name.
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok().map(NodeId)
}

/// The one node a certificate names. Refuses a certificate that names none, several, or has
/// any other name under [`NODE_NAME_SUFFIX`].
pub fn cert_node_id(cert: &CertificateDer<'_>) -> Result<NodeId, String> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("not a parsable certificate: {e}"))?;
    let mut found = None;
    for name in ee.valid_dns_names() {
        if !name.to_ascii_lowercase().ends_with(NODE_NAME_SUFFIX) {
            continue;
        }
        let Some(id) = node_id_from_name(name) else {
            return Err(format!("the name {name:?} is not a node identity name"));
        };
        match found {
            None => found = Some(id),
            Some(other) if other == id => {}
            Some(other) => return Err(format!("it names two nodes, {other} and {id}")),
        }
    }
    found.ok_or_else(|| format!("it names no node (no {} name)", node_name(NodeId(0))))
}

/// A CA certificate and its private key, in PEM.
#[derive(Clone)]
pub struct CaPem {
    /// The CA certificate: give it to every node.
    pub cert_pem: String,
    /// The CA's private key (PKCS#8): keep it off the nodes, it only signs node certificates.
    pub key_pem: String,
}

impl fmt::Debug for CaPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaPem").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// A node certificate and its private key, in PEM.
#[derive(Clone)]
pub struct NodeCertPem {
    /// The node it names.
    pub node: NodeId,
    /// The certificate, signed by the CA.
    pub cert_pem: String,
    /// The node's private key (PKCS#8).
    pub key_pem: String,
}

impl fmt::Debug for NodeCertPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCertPem")
            .field("node", &self.node)
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The CA certificate cannot be read.
    #[error("ca_cert: {0}")]
    BadCaCert(String),
    /// The CA key cannot be read.
    #[error("ca_key: {0}")]
    BadCaKey(String),
    /// The CA certificate and key do not belong together, or the CA was not made by
    /// [`generate_ca`] (whose subject name this crate rebuilds from the key).
    #[error(
        "ca_key: the certificate signed with this key does not chain to ca_cert ({0}); give \
         the key that belongs to the CA certificate, made by `highlander certs init`"
    )]
    Mismatch(String),
    /// An address for a node certificate is neither an IP address nor a DNS name.
    #[error("addresses: {0:?} is neither an IP address nor a DNS name")]
    BadAddress(String),
    /// An address for a node certificate is under the reserved identity suffix.
    #[error("addresses: {0:?} is under {NODE_NAME_SUFFIX}, which is reserved for node identities")]
    ReservedName(String),
    /// The validity is out of range.
    #[error("validity_days: {0}")]
    BadValidity(&'static str),
    /// The certificate could not be generated or signed.
    #[error("cannot make the certificate: {0}")]
    Generate(String),
}

fn generate_err(e: impl fmt::Display) -> CertError {
    CertError::Generate(e.to_string())
}

/// Makes a new cluster CA (ECDSA P-256, valid for `validity_days`): what `highlander certs
/// init` writes. Its subject name is derived from its key, so [`issue_node_cert`] needs only
/// the two PEM strings.
pub fn generate_ca(validity_days: u32) -> Result<CaPem, CertError> {
    if validity_days == 0 {
        return Err(CertError::BadValidity("must be more than zero"));
    }
    let key = KeyPair::generate().map_err(generate_err)?;
    let mut params = ca_params(&key);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + time::Duration::days(i64::from(validity_days));
    let cert = params.self_signed(&key).map_err(generate_err)?;
    Ok(CaPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Issues a certificate for node `node`, signed by the CA of [`generate_ca`]: what
/// `highlander certs issue --node-id N` writes. Besides the identity name it carries a
/// subject-alternative name for each of `addresses` (IP addresses, `ip:port` whose port is
/// dropped, or DNS names), for tools that check those; highlander itself checks only the
/// identity. The certificate is checked against `ca_cert_pem` before it is returned.
pub fn issue_node_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    node: NodeId,
    addresses: &[String],
    validity_days: u32,
) -> Result<NodeCertPem, CertError> {
    if validity_days == 0 {
        return Err(CertError::BadValidity("must be more than zero"));
    }
    let ca_certs = parse_certs(ca_cert_pem.as_bytes()).map_err(CertError::BadCaCert)?;
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| CertError::BadCaKey(e.to_string()))?;
    let issuer = Issuer::new(ca_params(&ca_key), ca_key);
    let sans = address_sans(addresses)?;
    let lifetime = Duration::from_secs(86_400) * validity_days;
    let (cert, key) = sign_node_cert(&issuer, node, sans, lifetime)?;
    let roots = root_store(&ca_certs).map_err(CertError::BadCaCert)?;
    verify_chain(&roots, std::slice::from_ref(cert.der())).map_err(CertError::Mismatch)?;
    Ok(NodeCertPem { node, cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The parameters of a cluster CA with key `key`: everything about it follows from the key,
/// so any holder of the key can rebuild the issuer.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    let fingerprint: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "highlander");
    dn.push(DnType::CommonName, format!("highlander cluster CA {fingerprint}"));
    params.distinguished_name = dn;
    // No intermediates below it: it signs node certificates only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn address_sans(addresses: &[String]) -> Result<Vec<SanType>, CertError> {
    let mut sans = Vec::with_capacity(addresses.len());
    for address in addresses {
        let address = address.trim();
        if let Ok(ip) = address.parse::<IpAddr>() {
            sans.push(SanType::IpAddress(ip));
        } else if let Ok(sa) = address.parse::<SocketAddr>() {
            sans.push(SanType::IpAddress(sa.ip()));
        } else {
            if address.to_ascii_lowercase().ends_with(NODE_NAME_SUFFIX) {
                return Err(CertError::ReservedName(address.to_owned()));
            }
            rustls::pki_types::DnsName::try_from(address)
                .map_err(|_| CertError::BadAddress(address.to_owned()))?;
            let name = address
                .to_owned()
                .try_into()
                .map_err(|_| CertError::BadAddress(address.to_owned()))?;
            sans.push(SanType::DnsName(name));
        }
    }
    Ok(sans)
}

/// Signs a fresh P-256 key's certificate for `node`, valid from a little before now for
/// `lifetime`.
fn sign_node_cert(
    issuer: &Issuer<'_, KeyPair>,
    node: NodeId,
    mut sans: Vec<SanType>,
    lifetime: Duration,
) -> Result<(rcgen::Certificate, KeyPair), CertError> {
    let identity = node_name(node).try_into().map_err(generate_err)?;
    sans.insert(0, SanType::DnsName(identity));
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "highlander");
    dn.push(DnType::CommonName, format!("highlander node {}", node.0));
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node is both a server (it is dialed) and a client (it dials).
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    let lifetime = time::Duration::try_from(lifetime).map_err(generate_err)?;
    params.not_after = now.checked_add(lifetime).ok_or(CertError::BadValidity("too long"))?;
    let key = KeyPair::generate().map_err(generate_err)?;
    let cert = params.signed_by(&key, issuer).map_err(generate_err)?;
    Ok((cert, key))
}

/// HKDF-SHA256 of `ikm` into `out` (at most 8160 bytes).
fn hkdf(salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8]) -> Result<(), CertError> {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| CertError::Generate("key derivation failed".into()))
}

const SECRET_SALT: &[u8] = b"highlander cluster secret v1";
const ENDPOINT_SALT: &[u8] = b"highlander endpoint keys v1";

/// The CA every node derives from a cluster secret: an Ed25519 key from HKDF-SHA256 over the
/// secret and a self-signed certificate that is the same, byte for byte, on every node.
pub(crate) struct DerivedCa {
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

pub(crate) fn derive_ca(secret: &ClusterSecret) -> Result<DerivedCa, CertError> {
    let mut seed = [0u8; 32];
    hkdf(SECRET_SALT, secret.bytes(), &[b"ca-key/ed25519"], &mut seed)?;
    // ring makes Ed25519 keys from a seed but rcgen takes PKCS#8: build the v2 document
    // ring itself writes (RFC 8410 private key plus the public key).
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|e| CertError::Generate(format!("derived key refused: {e}")))?;
    let public = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
    let mut pkcs8 = vec![
        0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&seed);
    pkcs8.extend_from_slice(&[0xa1, 0x23, 0x03, 0x21, 0x00]);
    pkcs8.extend_from_slice(&public);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8),
        &rcgen::PKCS_ED25519,
    )
    .map_err(generate_err)?;
    let mut params = ca_params(&key);
    // Fixed dates and a serial from the key: every node makes the identical certificate.
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.self_signed(&key).map_err(generate_err)?;
    Ok(DerivedCa { cert: cert.der().clone(), issuer: Issuer::new(params, key) })
}

/// The keys that make a node's QUIC endpoint recognisable across restarts: the stateless
/// reset key and the connection-id key. Derived from the node's secret (its private key file,
/// or the cluster secret), so they never need storing and a restart reproduces them.
#[derive(Clone)]
pub(crate) struct EndpointKeys {
    pub(crate) reset: [u8; 32],
    pub(crate) cid: u64,
}

fn endpoint_keys(ikm: &[u8], node: NodeId) -> Result<EndpointKeys, CertError> {
    let id = node.0.to_be_bytes();
    let mut reset = [0u8; 32];
    hkdf(ENDPOINT_SALT, ikm, &[b"stateless-reset/", &id], &mut reset)?;
    let mut cid = [0u8; 8];
    hkdf(ENDPOINT_SALT, ikm, &[b"connection-id/", &id], &mut cid)?;
    Ok(EndpointKeys { reset, cid: u64::from_be_bytes(cid) })
}

/// A node's loaded and checked identity.
pub(crate) struct NodeIdentity {
    pub(crate) roots: Arc<rustls::RootCertStore>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) endpoint: EndpointKeys,
    /// In cluster-secret mode, what renews the certificate.
    pub(crate) renewer: Option<Renewer>,
}

/// Issues the node's certificate again from the derived CA (cluster-secret mode).
pub(crate) struct Renewer {
    issuer: Issuer<'static, KeyPair>,
    node: NodeId,
    addresses: Vec<SanType>,
}

impl Renewer {
    pub(crate) fn issue(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
        let (cert, key) =
            sign_node_cert(&self.issuer, self.node, self.addresses.clone(), SECRET_CERT_LIFETIME)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone()], key))
    }
}

fn identity_err(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Identity { field, reason: reason.into() }
}

/// Reads and checks the identity of `config`: the node certificate must name exactly
/// `config.node_id`, chain to the CA and match the key.
pub(crate) fn load(config: &QuicConfig) -> Result<NodeIdentity, ConfigError> {
    let node = config.node_id;
    let (ca_certs, chain, key, renewer, ikm) = match &config.identity {
        Identity::PemFiles { ca_cert, node_cert, node_key } => {
            let read = |field, path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    identity_err(field, format!("{}: cannot read: {e}", path.display()))
                })
            };
            let ca = read("ca_cert", ca_cert)?;
            let cert = read("node_cert", node_cert)?;
            let key = read("node_key", node_key)?;
            fn at(field: &'static str, path: &std::path::Path) -> impl Fn(String) -> ConfigError {
                move |e| identity_err(field, format!("{}: {e}", path.display()))
            }
            let (ca, chain, key) = (
                parse_certs(&ca).map_err(at("ca_cert", ca_cert))?,
                parse_certs(&cert).map_err(at("node_cert", node_cert))?,
                parse_key(&key).map_err(at("node_key", node_key))?,
            );
            let ikm = key.secret_der().to_vec();
            (ca, chain, key, None, ikm)
        }
        Identity::Pem { ca_cert, node_cert, node_key } => {
            let ca = parse_certs(ca_cert.as_bytes()).map_err(|e| identity_err("ca_cert", e))?;
            let chain =
                parse_certs(node_cert.as_bytes()).map_err(|e| identity_err("node_cert", e))?;
            let key = parse_key(node_key.as_bytes()).map_err(|e| identity_err("node_key", e))?;
            let ikm = key.secret_der().to_vec();
            (ca, chain, key, None, ikm)
        }
        Identity::ClusterSecret(secret) => {
            let derived =
                derive_ca(secret).map_err(|e| identity_err("cluster_secret", e.to_string()))?;
            let own = config.peers.get(&node).map(|a| vec![SanType::IpAddress(a.ip())]);
            let renewer =
                Renewer { issuer: derived.issuer, node, addresses: own.unwrap_or_default() };
            let (chain, key) =
                renewer.issue().map_err(|e| identity_err("cluster_secret", e.to_string()))?;
            (vec![derived.cert], chain, key, Some(renewer), secret.bytes().to_vec())
        }
    };
    let cert_field = if renewer.is_some() { "cluster_secret" } else { "node_cert" };
    let roots = root_store(&ca_certs).map_err(|e| identity_err("ca_cert", e))?;
    let named = cert_node_id(&chain[0]).map_err(|e| {
        identity_err(cert_field, format!("the certificate cannot identify a node: {e}"))
    })?;
    if named != node {
        return Err(identity_err(
            cert_field,
            format!("the certificate is for node {named} but this node is {node}"),
        ));
    }
    verify_chain(&roots, &chain).map_err(|e| {
        identity_err(cert_field, format!("the certificate is not accepted by the CA: {e}"))
    })?;
    let provider = crate::tls::provider();
    let signer = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| identity_err("node_key", format!("unusable key: {e}")))?;
    rustls::sign::CertifiedKey::new(chain.clone(), signer).keys_match().map_err(|e| {
        identity_err("node_key", format!("the key does not belong to the certificate: {e}"))
    })?;
    let endpoint =
        endpoint_keys(&ikm, node).map_err(|e| identity_err("node_key", e.to_string()))?;
    Ok(NodeIdentity { roots, chain, key, endpoint, renewer })
}

fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    Ok(certs)
}

fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key: {e}"))
}

fn root_store(cas: &[CertificateDer<'static>]) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// Checks that `chain[0]` chains to `roots` for both uses a node makes of it.
fn verify_chain(roots: &rustls::RootCertStore, chain: &[CertificateDer<'_>]) -> Result<(), String> {
    let Some((ee, intermediates)) = chain.split_first() else {
        return Err("no certificate".into());
    };
    let ee = webpki::EndEntityCert::try_from(ee).map_err(|e| e.to_string())?;
    let algs = crate::tls::provider().signature_verification_algorithms.all;
    let now = UnixTime::now();
    for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
        ee.verify_for_usage(algs, &roots.roots, intermediates, now, usage, None, None)
            .map_err(|e| format!("{e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_refuse_non_canonical_forms() {
        assert_eq!(node_name(NodeId(7)), "node-7.highlander.invalid");
        for id in [0, 1, 42, u64::MAX] {
            assert_eq!(node_id_from_name(&node_name(NodeId(id))), Some(NodeId(id)));
        }
        assert_eq!(node_id_from_name("NODE-3.Highlander.Invalid"), Some(NodeId(3)));
        for bad in [
            "node-07.highlander.invalid",
            "node-.highlander.invalid",
            "node-+1.highlander.invalid",
            "node-1x.highlander.invalid",
            "*.highlander.invalid",
            "node-1.highlander.invalid.example",
            "node-18446744073709551616.highlander.invalid",
        ] {
            assert_eq!(node_id_from_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn issued_certificates_name_their_node_and_chain_to_the_ca() {
        let ca = generate_ca(30).unwrap();
        let addrs = vec!["127.0.0.1".to_string(), "10.0.0.1:7000".into(), "db-1.example".into()];
        let node = issue_node_cert(&ca.cert_pem, &ca.key_pem, NodeId(5), &addrs, 30).unwrap();
        let certs = parse_certs(node.cert_pem.as_bytes()).unwrap();
        assert_eq!(cert_node_id(&certs[0]), Ok(NodeId(5)));
        let roots = root_store(&parse_certs(ca.cert_pem.as_bytes()).unwrap()).unwrap();
        verify_chain(&roots, &certs).unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        // A key from another CA does not fit this CA's certificate.
        let other = generate_ca(30).unwrap();
        let err = issue_node_cert(&ca.cert_pem, &other.key_pem, NodeId(5), &[], 30).unwrap_err();
        assert!(matches!(err, CertError::Mismatch(_)), "{err}");
        assert!(matches!(
            issue_node_cert(
                &ca.cert_pem,
                &ca.key_pem,
                NodeId(5),
                &["node-6.highlander.invalid".into()],
                30
            ),
            Err(CertError::ReservedName(_))
        ));
        assert!(matches!(
            issue_node_cert(&ca.cert_pem, &ca.key_pem, NodeId(5), &["not a name".into()], 30),
            Err(CertError::BadAddress(_))
        ));
        assert!(matches!(
            issue_node_cert("garbage", &ca.key_pem, NodeId(5), &[], 30),
            Err(CertError::BadCaCert(_))
        ));
    }

    #[test]
    fn certificates_naming_several_nodes_or_wildcards_are_refused() {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::new(ca_params(&key), key);
        let two = vec![SanType::DnsName(node_name(NodeId(2)).try_into().unwrap())];
        let (cert, _) = sign_node_cert(&issuer, NodeId(1), two, Duration::from_secs(60)).unwrap();
        assert!(cert_node_id(cert.der()).unwrap_err().contains("two nodes"));
        let wild = vec![SanType::DnsName("*.highlander.invalid".try_into().unwrap())];
        let (cert, _) = sign_node_cert(&issuer, NodeId(1), wild, Duration::from_secs(60)).unwrap();
        assert!(cert_node_id(cert.der()).unwrap_err().contains("not a node identity"));
    }

    #[test]
    fn a_secret_derives_the_same_ca_everywhere_and_another_secret_does_not() {
        let s = ClusterSecret::generate().unwrap();
        let a = derive_ca(&s).unwrap();
        let b = derive_ca(&ClusterSecret::new(s.expose()).unwrap()).unwrap();
        assert_eq!(a.cert, b.cert);
        let c = derive_ca(&ClusterSecret::generate().unwrap()).unwrap();
        assert_ne!(a.cert, c.cert);
        let k1 = endpoint_keys(s.bytes(), NodeId(1)).unwrap();
        let k1b = endpoint_keys(s.bytes(), NodeId(1)).unwrap();
        let k2 = endpoint_keys(s.bytes(), NodeId(2)).unwrap();
        assert_eq!((k1.reset, k1.cid), (k1b.reset, k1b.cid));
        assert_ne!(k1.reset, k2.reset);
        assert_ne!(k1.cid, k2.cid);
    }
}
