//! TLS on both sides: the certificate clients see (loaded from files,
//! swapped on reload), the stream a session reads its client from, and the
//! connector used towards Postgres for each `sslmode`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{ClientTlsConfig, UpstreamConfig};

/// ALPN protocol name Postgres 17 clients send for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// First byte of a TLS ClientHello record: a client starting TLS directly
/// instead of with an SSLRequest.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// SSLRequest is answered `N`; every client is plaintext.
    #[default]
    Disable,
    /// TLS when the client asks for it, plaintext otherwise.
    Allow,
    /// Same as `allow` on the server side (the client decides).
    Prefer,
    /// A client that does not start TLS is refused.
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamSslMode {
    #[default]
    Disable,
    /// TLS if the server offers it, without checking its certificate.
    Prefer,
    /// TLS, without checking the certificate.
    Require,
    /// TLS with a certificate signed by the configured CA.
    VerifyCa,
    /// `verify-ca`, and the certificate names the host.
    VerifyFull,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What a listener needs to accept TLS clients: the acceptor and the
/// certificate's PEM (SCRAM-SHA-256-PLUS binds to it).
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub certificate_pem: Vec<u8>,
}

fn read_file(path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn load_certificates(path: &str) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), TlsError> {
    let pem = read_file(path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certificates.is_empty() {
        return Err(pem_error(path, "no certificate found"));
    }
    Ok((certificates, pem))
}

fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| pem_error(path, e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.2 is the lowest version offered, on both sides.
const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Loads the client-facing certificate, or `None` when TLS to clients is
/// off.
pub fn load_server(config: &ClientTlsConfig) -> Result<Option<Arc<ServerTls>>, TlsError> {
    if config.mode == ClientTlsMode::Disable || config.cert_file.is_empty() {
        return Ok(None);
    }
    let (certificates, certificate_pem) = load_certificates(&config.cert_file)?;
    let key = load_key(&config.key_file)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(certificates, key)?;
    // Clients negotiating with an SSLRequest send no ALPN; direct-TLS
    // clients must name "postgresql" (checked after the handshake).
    server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(Arc::new(ServerTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        certificate_pem,
    })))
}

/// The connector for `[upstream]`'s sslmode, or `None` for `disable`.
pub fn load_upstream(
    config: &UpstreamConfig,
) -> Result<Option<tokio_rustls::TlsConnector>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?;
    let builder = match config.sslmode {
        UpstreamSslMode::Disable => return Ok(None),
        UpstreamSslMode::Prefer | UpstreamSslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::AcceptAny(provider()))),
        UpstreamSslMode::VerifyCa | UpstreamSslMode::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            if config.sslrootcert.is_empty() {
                return Err(pem_error(
                    "upstream.sslrootcert",
                    "verify-ca and verify-full need a CA file",
                ));
            }
            let (cas, _) = load_certificates(&config.sslrootcert)?;
            for ca in cas {
                roots.add(ca)?;
            }
            let roots = Arc::new(roots);
            if config.sslmode == UpstreamSslMode::VerifyFull {
                builder.with_root_certificates(roots)
            } else {
                let inner =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| pem_error(&config.sslrootcert, e))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verify::AnyName(inner)))
            }
        }
    };
    let client = if config.sslcert.is_empty() {
        builder.with_no_client_auth()
    } else {
        let (certificates, _) = load_certificates(&config.sslcert)?;
        builder.with_client_auth_cert(certificates, load_key(&config.sslkey)?)?
    };
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(client))))
}

/// The name a server certificate is checked against.
pub fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Certificate checks for the modes that skip some of them.
mod verify {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

    /// `require`: encrypted, but the certificate is not checked (as libpq's
    /// `sslmode=require` without a root certificate). Signatures are still
    /// verified, so the peer holds the key of the certificate it sent.
    #[derive(Debug)]
    pub struct AcceptAny(pub Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the chain must lead to the CA; the host name is not
    /// compared.
    #[derive(Debug)]
    pub struct AnyName(pub Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

/// A byte stream that is plaintext TCP or TLS over it; the same type
/// serves the client side and the server side.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + AsyncWrite + Unpin> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// Reads what is available into `buf`; cancel-safe. A plaintext stream
    /// only grows the buffer once data is there, so an idle connection
    /// holds no read buffer.
    pub async fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            MaybeTls::Plain(stream) => loop {
                stream.readable().await?;
                crate::upstream::connection::reserve_for_read(buf);
                let room = buf.capacity() - buf.len();
                let mut read = None;
                // A read that did not fill the room it had emptied the
                // socket: its readiness is cleared now rather than by one
                // more read that would only say "would block" (a system
                // call per request saved). Data arriving after it raises
                // readiness again, and a clear never undoes a newer event.
                let outcome = stream.try_io(tokio::io::Interest::READABLE, || {
                    let n = stream.try_read_buf(buf)?;
                    read = Some(n);
                    if n > 0 && n < room {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(n)
                    }
                });
                match (outcome, read) {
                    (_, Some(n)) => return Ok(n),
                    (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    (outcome, None) => return outcome,
                }
            },
            MaybeTls::Tls(stream) => {
                crate::upstream::connection::reserve_for_read(buf);
                stream.read_buf(buf).await
            }
        }
    }

    /// Whether the peer has neither closed nor sent anything, checked
    /// without waiting: an idle server sends nothing, so anything readable
    /// (an EOF, an error, a stray message) means the connection is not
    /// fit for reuse.
    pub fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            MaybeTls::Plain(stream) => {
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            MaybeTls::Tls(stream) => {
                let waker = futures_util::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                let mut buf = ReadBuf::new(&mut probe);
                Pin::new(stream.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }

    pub fn tcp(&self) -> &TcpStream
    where
        T: TcpBacked,
    {
        match self {
            MaybeTls::Plain(stream) => stream,
            MaybeTls::Tls(stream) => stream.tcp(),
        }
    }
}

/// TLS streams that can name their socket.
pub trait TcpBacked {
    fn tcp(&self) -> &TcpStream;
}

impl TcpBacked for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl TcpBacked for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
