//! rustls configurations: TLS 1.3 only, ring only, mutual authentication against the cluster
//! CA, no 0-RTT and no resumption, the protocol version in ALPN, and verifiers that bind the
//! peer's certificate to a node id.

use crate::pki::{NodeIdentity, cert_node_id};
use highlander_core::NodeId;
use highlander_core::wire::PROTOCOL_VERSION;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::BTreeSet;
use std::sync::Arc;

/// The ALPN protocol name this build speaks: `highlander/<PROTOCOL_VERSION>`.
pub fn alpn() -> Vec<u8> {
    format!("highlander/{PROTOCOL_VERSION}").into_bytes()
}

/// The one crypto provider: ring. Passed explicitly everywhere so no process-wide default is
/// needed (and none can be picked by accident).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS configuration could not be built.
pub(crate) fn tls_err(e: impl std::fmt::Display) -> String {
    format!("TLS configuration: {e}")
}

/// The server side: a client certificate is required, must chain to the CA and name a node of
/// `members`.
pub(crate) fn server_crypto(
    identity: &NodeIdentity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    members: &BTreeSet<NodeId>,
) -> Result<QuicServerConfig, String> {
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        identity.roots.clone(),
        provider(),
    )
    .build()
    .map_err(tls_err)?;
    let verifier = Arc::new(MemberClientVerifier { inner, members: members.clone() });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![alpn()];
    // No 0-RTT (replayable) and no tickets: every connection is fully authenticated.
    tls.max_early_data_size = 0;
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    QuicServerConfig::try_from(tls).map_err(tls_err)
}

/// The client side: the server must chain to the CA and name exactly the node dialed.
pub(crate) fn client_crypto(
    identity: &NodeIdentity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<QuicClientConfig, String> {
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        identity.roots.clone(),
        provider(),
    )
    .build()
    .map_err(tls_err)?;
    let verifier = Arc::new(ExactNodeServerVerifier { inner });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        // Not less safe: the custom verifier runs rustls' own WebPKI verifier first.
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![alpn()];
    tls.enable_early_data = false;
    tls.resumption = rustls::client::Resumption::disabled();
    QuicClientConfig::try_from(tls).map_err(tls_err)
}

fn refuse(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        Refusal(reason),
    ))))
}

struct Refusal(String);

// rustls prints the reason with `{:?}`: keep it readable.
impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// rustls' WebPKI client verifier, then: the certificate names one node, and it is a member.
#[derive(Debug)]
struct MemberClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    members: BTreeSet<NodeId>,
}

impl ClientCertVerifier for MemberClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let id = cert_node_id(end_entity).map_err(refuse)?;
        if !self.members.contains(&id) {
            return Err(refuse(format!("node {id} is not in the peer list")));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// rustls' WebPKI server verifier (chain to the CA, and the dialed node's identity name), then:
/// the certificate names no other node, so a wildcard or a second identity cannot answer.
#[derive(Debug)]
struct ExactNodeServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for ExactNodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match server_name {
            ServerName::DnsName(name) => crate::pki::node_id_from_name(name.as_ref()),
            _ => None,
        };
        let Some(expected) = expected else {
            return Err(refuse(format!("{server_name:?} is not a node identity name")));
        };
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => {}
            // The chain is good (rustls checks it first) but the name is not: say which node
            // answered, since that is what the operator has to fix.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                let named = cert_node_id(end_entity)
                    .map_or_else(|e| format!("no node ({e})"), |id| format!("node {id}"));
                return Err(refuse(format!(
                    "the address dialed for {expected} answered as {named}; the peer list \
                     points at the wrong node"
                )));
            }
            Err(e) => return Err(e),
        }
        let id = cert_node_id(end_entity).map_err(refuse)?;
        if id != expected {
            return Err(refuse(format!("the address dialed for {expected} answered as {id}")));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The node a connection's peer proved to be, from its verified certificate.
pub(crate) fn peer_node(conn: &quinn::Connection) -> Result<NodeId, String> {
    let identity = conn.peer_identity().ok_or("the peer presented no certificate")?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "the peer identity is not a certificate chain")?;
    let ee = certs.first().ok_or("the peer presented an empty chain")?;
    cert_node_id(ee)
}
