//! Frames in and out: `amq-protocol`'s parser and generator over our buffers.

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame};
use amq_protocol::protocol::AMQPClass;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::WireError;

pub fn method(channel: u16, class: AMQPClass) -> AMQPFrame {
    AMQPFrame::Method(channel, class)
}

/// Appends `frames`, serialised, to `buf`.
pub fn encode(buf: &mut Vec<u8>, frames: &[AMQPFrame]) {
    for f in frames {
        let taken = std::mem::take(buf);
        *buf = cookie_factory::gen_simple(gen_frame(f), taken).expect("a frame serialises");
    }
}

/// The length of the first frame in `buf`, once all of it is there: a type
/// byte, a channel, a payload size, the payload and an end byte.
fn complete_frame(buf: &[u8]) -> Option<usize> {
    let size = u32::from_be_bytes(buf.get(3..7)?.try_into().ok()?) as usize;
    (buf.len() >= size + 8).then_some(size + 8)
}

/// The next whole frame out of `inbuf`, if it holds one.
pub fn take_frame(inbuf: &mut BytesMut) -> Result<Option<AMQPFrame>, WireError> {
    let Some(len) = complete_frame(inbuf) else {
        return Ok(None);
    };
    let raw = inbuf.split_to(len);
    match parse_frame(&raw[..]) {
        Ok((_, frame)) => Ok(Some(frame)),
        Err(e) => Err(WireError::Protocol(format!("unparsable frame: {e:?}"))),
    }
}

/// Reads until `inbuf` holds a whole frame, and returns it.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    rd: &mut R,
    inbuf: &mut BytesMut,
) -> Result<AMQPFrame, WireError> {
    loop {
        if let Some(f) = take_frame(inbuf)? {
            return Ok(f);
        }
        if rd.read_buf(inbuf).await? == 0 {
            return Err(WireError::Closed("the broker closed the connection".into()));
        }
    }
}

pub async fn write_frames<W: AsyncWrite + Unpin + ?Sized>(
    wr: &mut W,
    frames: &[AMQPFrame],
) -> Result<(), WireError> {
    let mut buf = Vec::new();
    encode(&mut buf, frames);
    wr.write_all(&buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic;

    #[test]
    fn frames_split_anywhere_come_out_whole_and_in_order() {
        let frames: Vec<AMQPFrame> = (1..=3u64)
            .map(|tag| {
                method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: tag,
                        multiple: false,
                    })),
                )
            })
            .chain([AMQPFrame::Heartbeat, AMQPFrame::Body(1, b"{}".to_vec())])
            .collect();
        let mut bytes = Vec::new();
        encode(&mut bytes, &frames);
        for cut in 0..bytes.len() {
            let mut inbuf = BytesMut::from(&bytes[..cut]);
            let mut got = Vec::new();
            while let Some(f) = take_frame(&mut inbuf).unwrap() {
                got.push(f);
            }
            inbuf.extend_from_slice(&bytes[cut..]);
            while let Some(f) = take_frame(&mut inbuf).unwrap() {
                got.push(f);
            }
            assert_eq!(got, frames, "cut at {cut}");
            assert!(inbuf.is_empty());
        }
    }
}
