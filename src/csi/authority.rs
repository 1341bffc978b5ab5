//! Lets any gRPC client in over the unix socket, whatever `:authority` it sends.
//!
//! kubelet sends `localhost`, but grpc-core clients (Python `grpcio` since 1.57, C++, Ruby)
//! send the percent-encoded socket path and grpc-java the raw path. The HTTP/2 layer under
//! tonic (h2) refuses a request whose `:authority` is not a valid URI authority and resets the
//! stream with PROTOCOL_ERROR, so those clients could not call the plugin at all.
//!
//! [`AnyAuthority`] wraps each accepted connection and rewrites the client's side of the
//! stream before h2 reads it: every header block (HEADERS plus its CONTINUATIONs) is decoded
//! with the client's HPACK state, an `:authority` that does not parse is replaced by
//! `localhost`, and the block is encoded again with a state of our own, which h2's decoder
//! follows from then on. Every other frame, and everything the server sends, passes through
//! unchanged. The authority means nothing on a unix socket; nothing else is altered.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE default).
const MAX_PAYLOAD: usize = 16_384;
/// Refuse header blocks larger than this (h2's own default header list limit is 16 MiB).
const MAX_BLOCK: usize = 1 << 20;

/// A header block being collected across HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// A connection whose client header blocks get a valid `:authority` (see the module docs).
pub struct AnyAuthority<S> {
    inner: S,
    /// Bytes read from the client and not yet processed.
    pending: Vec<u8>,
    /// Processed bytes ready for the server to read.
    ready: Vec<u8>,
    preface_left: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
}

impl<S> AnyAuthority<S> {
    pub fn new(inner: S) -> AnyAuthority<S> {
        AnyAuthority {
            inner,
            pending: Vec::new(),
            ready: Vec::new(),
            preface_left: PREFACE_LEN,
            block: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
        }
    }

    /// Moves every complete frame from `pending` to `ready`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.pending.len());
            self.ready.extend(self.pending.drain(..n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        let mut at = 0;
        while self.pending.len() - at >= FRAME_HEADER {
            let head = &self.pending[at..at + FRAME_HEADER];
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let end = at + FRAME_HEADER + length;
            if self.pending.len() < end {
                break;
            }
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let payload = self.pending[at + FRAME_HEADER..end].to_vec();
            let frame = &self.pending[at..end];
            match (kind, self.block.is_some()) {
                (HEADERS, false) => self.start_block(stream, flags, &payload)?,
                (CONTINUATION, true) => self.continue_block(stream, flags, &payload)?,
                (_, true) => {
                    return Err(protocol("a header block was interrupted by another frame"));
                }
                _ => self.ready.extend_from_slice(frame),
            }
            at = end;
        }
        self.pending.drain(..at);
        Ok(())
    }

    fn start_block(&mut self, stream: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        let mut body = payload;
        let mut padding = 0;
        if flags & PADDED != 0 {
            let (&pad, rest) = body
                .split_first()
                .ok_or_else(|| protocol("empty padded frame"))?;
            padding = pad as usize;
            body = rest;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let fields: [u8; 5] = body
                .get(..5)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| protocol("short priority fields"))?;
            priority = Some(fields);
            body = &body[5..];
        }
        let fragment = body
            .get(
                ..body
                    .len()
                    .checked_sub(padding)
                    .ok_or_else(|| protocol("padding too long"))?,
            )
            .ok_or_else(|| protocol("padding too long"))?;
        self.block = Some(Block {
            stream,
            flags,
            priority,
            fragment: fragment.to_vec(),
        });
        if flags & END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    fn continue_block(&mut self, stream: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        let block = self
            .block
            .as_mut()
            .ok_or_else(|| protocol("stray CONTINUATION"))?;
        if block.stream != stream {
            return Err(protocol("CONTINUATION on another stream"));
        }
        if block.fragment.len() + payload.len() > MAX_BLOCK {
            return Err(protocol("header block too large"));
        }
        block.fragment.extend_from_slice(payload);
        if flags & END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    /// Decodes the collected block, fixes `:authority`, and writes it out re-encoded.
    fn finish_block(&mut self) -> io::Result<()> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let mut headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| protocol(&format!("undecodable header block: {e:?}")))?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let priority = block.priority.map_or_else(Vec::new, |p| p.to_vec());
        let first_room = MAX_PAYLOAD - priority.len();
        let mut chunks = vec![&encoded[..encoded.len().min(first_room)]];
        chunks.extend(encoded[chunks[0].len()..].chunks(MAX_PAYLOAD));
        let last = chunks.len() - 1;
        for (index, chunk) in chunks.into_iter().enumerate() {
            let (kind, mut flags, lead) = if index == 0 {
                (
                    HEADERS,
                    block.flags & (END_STREAM | PRIORITY),
                    priority.as_slice(),
                )
            } else {
                (CONTINUATION, 0, &[][..])
            };
            if index == last {
                flags |= END_HEADERS;
            }
            let length = (lead.len() + chunk.len()) as u32;
            self.ready.extend_from_slice(&length.to_be_bytes()[1..]);
            self.ready.extend_from_slice(&[kind, flags]);
            self.ready.extend_from_slice(&block.stream.to_be_bytes());
            self.ready.extend_from_slice(lead);
            self.ready.extend_from_slice(chunk);
        }
        Ok(())
    }
}

fn protocol(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from the client: {what}"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.drain(..n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.pending.extend_from_slice(read.filled());
                    this.process()?;
                }
                other => return other,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AnyAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Splits a byte stream of frames into (kind, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= FRAME_HEADER {
            let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + length].to_vec()));
            bytes = &bytes[9 + length..];
        }
        out
    }

    #[tokio::test]
    async fn invalid_authorities_become_localhost_and_the_rest_is_kept() {
        let request = |authority: &'static [u8], path: &'static [u8], big: bool| {
            let mut headers = vec![
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", authority),
                (b"content-type", b"application/grpc"),
            ];
            if big {
                // Larger than one frame: the output must split it again.
                headers.push((b"x-big", &[b'a'; 20_000][..]));
            }
            headers
        };
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // As grpc-core encodes it: the first request adds :path, :authority and content-type
        // to the dynamic table (literals with incremental indexing, names from the static
        // table); the second refers to all three by index (64, 63, 62).
        let literal = |name_index: u8, value: &[u8]| {
            let mut out = vec![0x40 | name_index, value.len() as u8];
            out.extend_from_slice(value);
            out
        };
        let mut first = vec![0x83, 0x86];
        first.extend(literal(4, b"/csi.v1.Identity/Probe"));
        first.extend(literal(1, b"%2Ftmp%2Fcsi.sock"));
        first.extend(literal(31, b"application/grpc"));
        // Padded, with priority, and split into HEADERS + CONTINUATION.
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(&first[..30]);
        payload.extend_from_slice(&[0, 0, 0]);
        wire.extend(frame(HEADERS, PADDED | PRIORITY, 1, &payload));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, &first[30..]));
        wire.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        let second = [0x83, 0x86, 0x80 | 64, 0x80 | 63, 0x80 | 62];
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let mut client = loona_hpack::Encoder::new();
        let third = client.encode(request(
            b"/var/run/csi.sock",
            b"/csi.v1.Node/NodeGetInfo",
            true,
        ));
        wire.extend(frame(HEADERS, END_HEADERS, 5, &third));

        let (mut near, far) = tokio::io::duplex(1 << 20);
        let mut fixed = AnyAuthority::new(far);
        // Trickle the bytes in small pieces: frames must survive arbitrary splits.
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(7) {
                near.write_all(piece).await.unwrap();
            }
            near.shutdown().await.unwrap();
            near
        });
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();

        assert_eq!(&out[..PREFACE_LEN], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let frames = frames(&out[PREFACE_LEN..]);
        let mut server = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut current = Vec::new();
        for (kind, flags, stream, payload) in &frames {
            match *kind {
                HEADERS => {
                    let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                    assert_eq!(flags & PADDED, 0);
                    current = payload[skip..].to_vec();
                    if flags & END_HEADERS != 0 {
                        blocks.push((*stream, *flags, std::mem::take(&mut current)));
                    }
                }
                CONTINUATION => {
                    current.extend_from_slice(payload);
                    if flags & END_HEADERS != 0 {
                        blocks.push((*stream, *flags, std::mem::take(&mut current)));
                    }
                }
                _ => {}
            }
            assert!(payload.len() <= MAX_PAYLOAD);
        }
        assert_eq!(blocks.len(), 3);
        let decoded: Vec<_> = blocks
            .iter()
            .map(|(_, _, b)| server.decode(b).unwrap())
            .collect();
        let get = |headers: &Vec<(Vec<u8>, Vec<u8>)>, name: &[u8]| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        for headers in &decoded {
            assert_eq!(get(headers, b":authority"), b"localhost");
            assert_eq!(get(headers, b"content-type"), b"application/grpc");
        }
        assert_eq!(get(&decoded[2], b"x-big").len(), 20_000);
        assert!(
            frames.iter().any(|f| f.0 == CONTINUATION),
            "a block over one frame is split"
        );
        assert_eq!(get(&decoded[2], b":path"), b"/csi.v1.Node/NodeGetInfo");
        assert!(
            frames
                .iter()
                .any(|(kind, flags, _, _)| *kind == 0 && flags & END_STREAM != 0)
        );
        assert!(
            frames
                .iter()
                .filter(|f| f.0 == HEADERS)
                .any(|f| f.1 & END_STREAM != 0),
            "END_STREAM kept"
        );
    }

    #[tokio::test]
    async fn a_broken_header_block_closes_the_connection() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0x0f],
        ));
        let (mut near, far) = tokio::io::duplex(1 << 16);
        near.write_all(&wire).await.unwrap();
        drop(near);
        let mut fixed = AnyAuthority::new(far);
        let mut out = Vec::new();
        let err = fixed.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
