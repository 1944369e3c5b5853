//! The KV cache of incremental GPT-2 decoding, apart from the network so the decoder's row
//! bookkeeping (reorder, drop, join) reads on its own.
use crate::model::gpt2::Gpt2Config;
use tch::{Device, Kind, Tensor};

/// Keys and values of every layer for a batch of rows, in preallocated `[B, H, cap, D]`
/// buffers written in place (no per-step concatenation).
///
/// Rows are right-aligned: all share the column count `len`, and a row that joined later or
/// was left-padded has invalid leading columns (`valid` false). `next_pos` is each row's next
/// position id.
// The fields and `reserve` are `pub(super)`: `Gpt2::forward` writes into the buffers in place.
#[derive(Debug)]
pub struct KvCache {
    pub(super) k: Vec<Tensor>,
    pub(super) v: Vec<Tensor>,
    pub(super) valid: Tensor,
    pub(super) next_pos: Tensor,
    pub(super) len: i64,
    /// Whether any row has invalid columns, so attention needs an explicit mask.
    pub(super) padded: bool,
    /// Buffers shaped like `k`/`v` that a beam reorder gathers into and then swaps with, so
    /// the per-step reorder allocates nothing and copies only the used columns.
    spare: Option<(Vec<Tensor>, Vec<Tensor>)>,
}

impl KvCache {
    pub fn new(cfg: &Gpt2Config, rows: i64, capacity: i64, device: Device, kind: Kind) -> Self {
        let shape = [rows, cfg.n_head, capacity.max(1), cfg.head_dim()];
        let layers = cfg.n_layer as usize;
        KvCache {
            k: (0..layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect(),
            v: (0..layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect(),
            valid: Tensor::zeros([rows, capacity.max(1)], (Kind::Bool, device)),
            next_pos: Tensor::zeros([rows], (Kind::Int64, device)),
            len: 0,
            padded: false,
            spare: None,
        }
    }

    pub fn rows(&self) -> i64 {
        self.valid.size()[0]
    }

    /// Columns in use (the longest row's length).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element type keys and values are stored in.
    pub fn kind(&self) -> Kind {
        self.k.first().map_or(Kind::Float, |t| t.kind())
    }

    pub fn capacity(&self) -> i64 {
        self.valid.size()[1]
    }

    /// Keeps rows `idx` (an Int64 tensor on the cache's device, repeats allowed), in that order:
    /// beam reordering and dropping finished rows.
    pub fn select_rows(&mut self, idx: &Tensor) {
        let len = self.len;
        let gather_into = |dst: &Tensor, src: &Tensor| {
            if len > 0 {
                let _ = src
                    .narrow(2, 0, len)
                    .index_select_out(&dst.narrow(2, 0, len), 0, idx);
            }
        };
        if idx.size()[0] == self.rows() {
            // Same row count (a beam reorder): gather into the spare buffers and swap.
            let (sk, sv) = self.spare.get_or_insert_with(|| {
                let empty = |t: &Tensor| t.empty_like();
                (
                    self.k.iter().map(empty).collect(),
                    self.v.iter().map(empty).collect(),
                )
            });
            for (dst, src) in sk.iter().zip(&self.k).chain(sv.iter().zip(&self.v)) {
                gather_into(dst, src);
            }
            std::mem::swap(sk, &mut self.k);
            std::mem::swap(sv, &mut self.v);
        } else {
            // Rows left or repeat: new buffers of the new row count (columns past `len` are
            // written before they are read).
            self.spare = None;
            for t in self.k.iter_mut().chain(self.v.iter_mut()) {
                let mut shape = t.size();
                shape[0] = idx.size()[0];
                let dst = Tensor::empty(shape.as_slice(), (t.kind(), t.device()));
                gather_into(&dst, t);
                *t = dst;
            }
        }
        self.valid = self.valid.index_select(0, idx);
        self.next_pos = self.next_pos.index_select(0, idx);
    }

    /// `select_rows` with the index on the host: rows that keep their own history are not
    /// copied (in beam search most beams extend themselves), and when few rows change only
    /// those are copied in place.
    pub fn select_rows_from(&mut self, idx: &[i64]) {
        let rows = self.rows();
        let device = self.valid.device();
        if idx.len() as i64 == rows {
            let changed: Vec<i64> = (0..rows).filter(|&r| idx[r as usize] != r).collect();
            if changed.is_empty() {
                return;
            }
            // Gather then copy: 2 row copies per changed row, against 1 per row for a full
            // gather; so only when at most half the rows change.
            if 2 * changed.len() as i64 <= rows {
                let sources: Vec<i64> = changed.iter().map(|&r| idx[r as usize]).collect();
                let dst = Tensor::from_slice(&changed).to_device(device);
                let src = Tensor::from_slice(&sources).to_device(device);
                let len = self.len;
                // The sources are gathered before any row is written, so swapped rows are safe.
                let move_rows = |t: &mut Tensor, cols: Option<i64>| {
                    let mut view = match cols {
                        Some(c) => t.narrow(2, 0, c),
                        None => t.shallow_clone(),
                    };
                    let moved = view.index_select(0, &src);
                    let _ = view.index_copy_(0, &dst, &moved);
                };
                if len > 0 {
                    for t in self.k.iter_mut().chain(self.v.iter_mut()) {
                        move_rows(t, Some(len));
                    }
                }
                move_rows(&mut self.valid, None);
                move_rows(&mut self.next_pos, None);
                return;
            }
        }
        self.select_rows(&Tensor::from_slice(idx).to_device(device));
    }

    /// Appends the rows of `other` below ours, right-aligning the shorter side with invalid
    /// leading columns. Used when new requests join a running decode.
    pub fn append_rows(&mut self, other: KvCache) {
        let len = self.len.max(other.len);
        let cap = self.capacity().max(other.capacity()).max(len);
        let mine = self.realigned(len, cap);
        let theirs = other.realigned(len, cap);
        let padded = self.padded || other.padded || self.len != other.len;
        for (i, (a, b)) in mine.k.iter().zip(theirs.k.iter()).enumerate() {
            self.k[i] = Tensor::cat(&[a, b], 0);
        }
        for (i, (a, b)) in mine.v.iter().zip(theirs.v.iter()).enumerate() {
            self.v[i] = Tensor::cat(&[a, b], 0);
        }
        self.valid = Tensor::cat(&[&mine.valid, &theirs.valid], 0);
        self.next_pos = Tensor::cat(&[&mine.next_pos, &theirs.next_pos], 0);
        self.len = len;
        self.padded = padded;
        self.spare = None;
    }

    /// A copy whose used columns end at `len` in a buffer of `cap` columns.
    fn realigned(&self, len: i64, cap: i64) -> KvCache {
        let shift = len - self.len;
        if shift == 0 && cap == self.capacity() {
            return KvCache {
                k: self.k.iter().map(|t| t.shallow_clone()).collect(),
                v: self.v.iter().map(|t| t.shallow_clone()).collect(),
                valid: self.valid.shallow_clone(),
                next_pos: self.next_pos.shallow_clone(),
                len,
                padded: self.padded,
                spare: None,
            };
        }
        let move_cols = |t: &Tensor, dim: i64| {
            let mut shape = t.size();
            shape[dim as usize] = cap;
            let out = Tensor::zeros(shape, (t.kind(), t.device()));
            if self.len > 0 {
                out.narrow(dim, shift, self.len)
                    .copy_(&t.narrow(dim, 0, self.len));
            }
            out
        };
        KvCache {
            k: self.k.iter().map(|t| move_cols(t, 2)).collect(),
            v: self.v.iter().map(|t| move_cols(t, 2)).collect(),
            valid: move_cols(&self.valid, 1),
            next_pos: self.next_pos.shallow_clone(),
            len,
            padded: self.padded || shift > 0,
            spare: None,
        }
    }

    /// Makes room for `extra` more columns: first by dropping leading columns no row uses any
    /// more (rows that left), else by doubling the buffers.
    pub(super) fn reserve(&mut self, extra: i64) {
        if self.len + extra <= self.capacity() {
            return;
        }
        let unused = if self.len == 0 || self.rows() == 0 {
            self.len
        } else {
            // Leading columns invalid for every row; one host read, only when the buffer is full.
            let any = self.valid.narrow(1, 0, self.len).any_dim(0, false);
            let first = any.to_kind(Kind::Int64).argmax(0, false);
            let has = bool::try_from(any.any()).unwrap_or(false);
            if has {
                i64::try_from(first).unwrap_or(0)
            } else {
                self.len
            }
        };
        let keep = self.len - unused;
        let cap = (keep + extra).max(self.capacity()).max(2 * (keep + extra));
        let shift_left = |t: &Tensor, dim: i64| {
            let mut shape = t.size();
            shape[dim as usize] = cap;
            let out = Tensor::zeros(shape, (t.kind(), t.device()));
            if keep > 0 {
                out.narrow(dim, 0, keep).copy_(&t.narrow(dim, unused, keep));
            }
            out
        };
        self.k = self.k.iter().map(|t| shift_left(t, 2)).collect();
        self.v = self.v.iter().map(|t| shift_left(t, 2)).collect();
        self.spare = None;
        self.valid = shift_left(&self.valid, 1);
        self.len = keep;
    }
}
