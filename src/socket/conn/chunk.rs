//! Following a chunked request body byte by byte (RFC 9112 §7.1), to
//! find where the next request head starts.

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

#[derive(Debug, PartialEq)]
pub(super) enum ChunkEnd {
    More,
    Done,
    /// Not a well-formed chunked body: the request is refused and the
    /// connection closed.
    Lost,
}

impl Chunk {
    /// Follows the body through `data`: how many bytes it took, and
    /// whether the body ended there.
    pub(super) fn follow(&mut self, data: &[u8]) -> (usize, ChunkEnd) {
        use Chunk::*;
        let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
        let mut i = 0;
        while i < data.len() {
            if let Data(left) = self {
                let n = (*left).min((data.len() - i) as u64);
                *left -= n;
                i += n as usize;
                if *left == 0 {
                    *self = DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            let next = match (*self, b) {
                (Start, b) => hex(b).map(Size),
                (Size(n), b) if hex(b).is_some() => n
                    .checked_mul(16)
                    .and_then(|n| n.checked_add(hex(b)?))
                    .map(Size),
                (Size(n) | SizeLws(n), b'\t' | b' ') => Some(SizeLws(n)),
                (Size(n) | SizeLws(n), b';') => Some(Extension(n)),
                (Size(n) | SizeLws(n) | Extension(n), b'\r') => Some(SizeLf(n)),
                (Extension(_), b'\n') => None,
                (Extension(n), _) => Some(Extension(n)),
                (SizeLf(0), b'\n') => Some(EndCr),
                (SizeLf(n), b'\n') => Some(Data(n)),
                (DataCr, b'\r') => Some(DataLf),
                (DataLf, b'\n') => Some(Start),
                (EndCr, b'\r') => Some(EndLf),
                (Trailer, b'\r') => Some(TrailerLf),
                (EndCr | Trailer, _) => Some(Trailer),
                (TrailerLf, b'\n') => Some(EndCr),
                (EndLf, b'\n') => return (i, ChunkEnd::Done),
                _ => None,
            };
            match next {
                Some(s) => *self = s,
                None => return (i, ChunkEnd::Lost),
            }
        }
        (i, ChunkEnd::More)
    }
}
