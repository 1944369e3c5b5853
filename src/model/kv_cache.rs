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
///
/// The buffers have room for more rows than are in use (`k`/`v` are views of their first
/// `rows`), grown by doubling: under continuous batching a join writes only its own rows and
/// a leave moves only the rows behind it, instead of copying every running row's history.
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
    /// The buffers `k` and `v` view, `[row room, H, cap, D]`.
    store: Stores,
    /// Buffers shaped like `store` that a beam reorder gathers into and then swaps with, so
    /// the per-step reorder allocates nothing and copies only the used columns.
    spare: Option<Stores>,
}

/// Every layer's key and value buffers.
#[derive(Debug)]
struct Stores {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Stores {
    fn zeros(shape: [i64; 4], layers: usize, kind: Kind, device: Device) -> Self {
        let make = || {
            (0..layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect()
        };
        Stores {
            k: make(),
            v: make(),
        }
    }

    fn empty_like(&self) -> Self {
        let e = |ts: &[Tensor]| ts.iter().map(|t| t.empty_like()).collect();
        Stores {
            k: e(&self.k),
            v: e(&self.v),
        }
    }

    fn room(&self) -> i64 {
        self.k.first().map_or(0, |t| t.size()[0])
    }

    fn pairs(&self) -> impl Iterator<Item = &Tensor> {
        self.k.iter().chain(self.v.iter())
    }
}

impl KvCache {
    pub fn new(cfg: &Gpt2Config, rows: i64, capacity: i64, device: Device, kind: Kind) -> Self {
        let shape = [rows, cfg.n_head, capacity.max(1), cfg.head_dim()];
        let store = Stores::zeros(shape, cfg.n_layer as usize, kind, device);
        let mut cache = KvCache {
            k: vec![],
            v: vec![],
            valid: Tensor::zeros([rows, capacity.max(1)], (Kind::Bool, device)),
            next_pos: Tensor::zeros([rows], (Kind::Int64, device)),
            len: 0,
            padded: false,
            store,
            spare: None,
        };
        cache.view_rows(rows);
        cache
    }

    /// Points `k`/`v` at the first `rows` rows of the buffers.
    fn view_rows(&mut self, rows: i64) {
        self.k = self.store.k.iter().map(|t| t.narrow(0, 0, rows)).collect();
        self.v = self.store.v.iter().map(|t| t.narrow(0, 0, rows)).collect();
    }

    /// Rows the buffers hold before they must grow.
    pub fn row_room(&self) -> i64 {
        self.store.room()
    }

    /// Grows the buffers to hold at least `rows` rows (doubling), keeping the rows in use.
    fn make_room(&mut self, rows: i64) {
        let room = self.row_room();
        if rows <= room {
            return;
        }
        let mut shape = self.store.k[0].size();
        shape[0] = rows.max(2 * room);
        let shape: [i64; 4] = shape.try_into().expect("4-d cache buffers");
        let kind = self.kind();
        let grown = Stores::zeros(shape, self.k.len(), kind, self.valid.device());
        let (used, len) = (self.rows(), self.len);
        if len > 0 {
            for (dst, src) in grown.pairs().zip(self.k.iter().chain(self.v.iter())) {
                dst.narrow(0, 0, used)
                    .narrow(2, 0, len)
                    .copy_(&src.narrow(2, 0, len));
            }
        }
        self.store = grown;
        self.spare = None;
        self.view_rows(used);
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
        let (len, rows) = (self.len, idx.size()[0]);
        if rows > self.row_room() {
            // More rows than the buffers hold (a prefill's rows repeated per beam): new ones.
            let mut shape = self.store.k[0].size();
            shape[0] = rows;
            let shape: [i64; 4] = shape.try_into().expect("4-d cache buffers");
            self.spare = Some(Stores::zeros(
                shape,
                self.k.len(),
                self.kind(),
                idx.device(),
            ));
        }
        // Gather into the spare buffers and swap (columns past `len` are written before they
        // are read).
        let spare = match self.spare.take() {
            Some(s) => s,
            None => self.store.empty_like(),
        };
        if len > 0 {
            for (dst, src) in spare.pairs().zip(self.k.iter().chain(self.v.iter())) {
                let _ = src.narrow(2, 0, len).index_select_out(
                    &dst.narrow(0, 0, rows).narrow(2, 0, len),
                    0,
                    idx,
                );
            }
        }
        let used = std::mem::replace(&mut self.store, spare);
        // Buffers of another row room are not worth keeping as the spare.
        if used.room() == self.row_room() {
            self.spare = Some(used);
        }
        self.view_rows(rows);
        self.valid = self.valid.index_select(0, idx);
        self.next_pos = self.next_pos.index_select(0, idx);
    }

    /// `select_rows` with the index on the host: rows that keep their place are not copied
    /// (in beam search most beams extend themselves; when an image leaves, only the rows
    /// behind it move), and when few rows change only those are copied in place.
    pub fn select_rows_from(&mut self, idx: &[i64]) {
        let (rows, kept) = (self.rows(), idx.len() as i64);
        let device = self.valid.device();
        if kept <= rows {
            let changed: Vec<i64> = (0..kept).filter(|&r| idx[r as usize] != r).collect();
            // Gather then copy: 2 row copies per changed row, against 1 per kept row for a
            // full gather; so only when at most half the kept rows change.
            if 2 * changed.len() as i64 <= kept {
                if !changed.is_empty() {
                    let sources: Vec<i64> = changed.iter().map(|&r| idx[r as usize]).collect();
                    let dst = Tensor::from_slice(&changed).to_device(device);
                    let src = Tensor::from_slice(&sources).to_device(device);
                    let len = self.len;
                    // The sources are gathered before any row is written, so swapped rows
                    // are safe.
                    let move_rows = |t: &Tensor, cols: Option<i64>| {
                        let mut view = match cols {
                            Some(c) => t.narrow(2, 0, c),
                            None => t.shallow_clone(),
                        };
                        let moved = view.index_select(0, &src);
                        let _ = view.index_copy_(0, &dst, &moved);
                    };
                    if len > 0 {
                        for t in self.k.iter().chain(self.v.iter()) {
                            move_rows(t, Some(len));
                        }
                    }
                    move_rows(&self.valid, None);
                    move_rows(&self.next_pos, None);
                }
                if kept < rows {
                    self.view_rows(kept);
                    self.valid = self.valid.narrow(0, 0, kept);
                    self.next_pos = self.next_pos.narrow(0, 0, kept);
                }
                return;
            }
        }
        self.select_rows(&Tensor::from_slice(idx).to_device(device));
    }

    /// Appends the rows of `other` below ours, right-aligning the shorter side with invalid
    /// leading columns. Used when new requests join a running decode: when the joiners are no
    /// longer than the running rows (the usual case), only their rows are written.
    pub fn append_rows(&mut self, other: KvCache) {
        if other.len > self.len || other.kind() != self.kind() {
            return self.append_realigned(other);
        }
        let (rows, theirs, len) = (self.rows(), other.rows(), self.len);
        let shift = len - other.len;
        self.make_room(rows + theirs);
        for (dst, src) in self.store.pairs().zip(other.k.iter().chain(other.v.iter())) {
            let dst = dst.narrow(0, rows, theirs);
            // Invalid columns are masked, but must hold finite numbers (a masked NaN still
            // poisons the softmax).
            if shift > 0 {
                let _ = dst.narrow(2, 0, shift).zero_();
            }
            if other.len > 0 {
                dst.narrow(2, shift, other.len)
                    .copy_(&src.narrow(2, 0, other.len));
            }
        }
        let valid = Tensor::zeros([theirs, self.capacity()], (Kind::Bool, self.valid.device()));
        if other.len > 0 {
            valid
                .narrow(1, shift, other.len)
                .copy_(&other.valid.narrow(1, 0, other.len));
        }
        self.valid = Tensor::cat(&[&self.valid, &valid], 0);
        self.next_pos = Tensor::cat(&[&self.next_pos, &other.next_pos], 0);
        self.padded = self.padded || other.padded || shift > 0;
        self.view_rows(rows + theirs);
    }

    /// `append_rows` when the joiners are longer: both sides move to new buffers.
    fn append_realigned(&mut self, other: KvCache) {
        let len = self.len.max(other.len);
        let cap = self.capacity().max(other.capacity()).max(len);
        let mine = self.realigned(len, cap);
        let theirs = other.realigned(len, cap);
        let padded = self.padded || other.padded || self.len != other.len;
        let cat = |a: &[Tensor], b: &[Tensor]| -> Vec<Tensor> {
            a.iter()
                .zip(b)
                .map(|(a, b)| Tensor::cat(&[a, b], 0))
                .collect()
        };
        self.store = Stores {
            k: cat(&mine.k, &theirs.k),
            v: cat(&mine.v, &theirs.v),
        };
        self.valid = Tensor::cat(&[&mine.valid, &theirs.valid], 0);
        self.next_pos = Tensor::cat(&[&mine.next_pos, &theirs.next_pos], 0);
        self.len = len;
        self.padded = padded;
        self.spare = None;
        self.view_rows(self.store.room());
    }

    /// Our rows' keys and values with their used columns ending at `len`, in buffers of `cap`
    /// columns (views of ours when nothing moves).
    fn realigned(&self, len: i64, cap: i64) -> Realigned {
        let shift = len - self.len;
        if shift == 0 && cap == self.capacity() {
            return Realigned {
                k: self.k.iter().map(|t| t.shallow_clone()).collect(),
                v: self.v.iter().map(|t| t.shallow_clone()).collect(),
                valid: self.valid.shallow_clone(),
                next_pos: self.next_pos.shallow_clone(),
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
        Realigned {
            k: self.k.iter().map(|t| move_cols(t, 2)).collect(),
            v: self.v.iter().map(|t| move_cols(t, 2)).collect(),
            valid: move_cols(&self.valid, 1),
            next_pos: self.next_pos.shallow_clone(),
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
        let rows = self.rows();
        let mut shape: [i64; 4] = self.store.k[0].size().try_into().expect("4-d buffers");
        shape[2] = cap;
        let moved = Stores::zeros(shape, self.k.len(), self.kind(), self.valid.device());
        if keep > 0 {
            for (dst, src) in moved.pairs().zip(self.k.iter().chain(self.v.iter())) {
                dst.narrow(0, 0, rows)
                    .narrow(2, 0, keep)
                    .copy_(&src.narrow(2, unused, keep));
            }
        }
        self.store = moved;
        self.spare = None;
        self.view_rows(rows);
        let valid = Tensor::zeros([rows, cap], (Kind::Bool, self.valid.device()));
        if keep > 0 {
            valid
                .narrow(1, 0, keep)
                .copy_(&self.valid.narrow(1, unused, keep));
        }
        self.valid = valid;
        self.len = keep;
    }
}

/// A cache's rows moved to a common column layout before two caches are concatenated.
struct Realigned {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    valid: Tensor,
    next_pos: Tensor,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Gpt2Config {
        Gpt2Config {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            ..Gpt2Config::gpt2_small()
        }
    }

    /// A cache of `rows` rows whose first `len` columns hold random keys and values.
    fn filled(rows: i64, len: i64, cap: i64) -> KvCache {
        let mut c = KvCache::new(&cfg(), rows, cap, Device::Cpu, Kind::Float);
        for t in c.k.iter().chain(c.v.iter()) {
            let shape = t.narrow(2, 0, len).size();
            t.narrow(2, 0, len)
                .copy_(&Tensor::randn(shape, (Kind::Float, Device::Cpu)));
        }
        let _ = c.valid.narrow(1, 0, len).fill_(1);
        let _ = c.next_pos.fill_(len);
        c.len = len;
        c
    }

    fn snapshot(c: &KvCache) -> Vec<Tensor> {
        let len = c.len;
        c.k.iter()
            .chain(c.v.iter())
            .map(|t| t.narrow(2, 0, len).copy())
            .collect()
    }

    #[test]
    fn joiners_land_right_aligned_below_the_running_rows_and_grow_the_room_by_doubling() {
        let mut running = filled(3, 5, 8);
        let before = snapshot(&running);
        let joiner = filled(2, 3, 6);
        let theirs = snapshot(&joiner);
        running.append_rows(joiner);
        assert_eq!(
            (running.rows(), running.len(), running.row_room()),
            (5, 5, 6)
        );
        for (i, t) in snapshot(&running).iter().enumerate() {
            assert!(t.narrow(0, 0, 3).equal(&before[i]), "running rows kept");
            let new = t.narrow(0, 3, 2);
            assert!(
                new.narrow(2, 2, 3).equal(&theirs[i]),
                "joiner's columns end at len"
            );
            assert_eq!(new.narrow(2, 0, 2).abs().max().double_value(&[]), 0.0);
        }
        let valid: Vec<bool> = Vec::try_from(running.valid.narrow(1, 0, 5).flatten(0, 1)).unwrap();
        let want: Vec<bool> = [[true; 5]; 3]
            .into_iter()
            .flatten()
            .chain([[false, false, true, true, true]; 2].into_iter().flatten())
            .collect();
        assert_eq!(valid, want);
        assert!(running.padded);
        // A second join fits the doubled room: written in place, the buffers stay.
        let store = running.store.k[0].data_ptr();
        running.append_rows(filled(1, 5, 6));
        assert_eq!((running.rows(), running.row_room()), (6, 6));
        assert_eq!(running.store.k[0].data_ptr(), store);
    }

    #[test]
    fn a_leave_moves_only_the_rows_behind_it_and_equals_a_gather() {
        for idx in [
            vec![0, 1, 3, 4, 5, 6, 7],    // one row leaves: rows behind it move up
            vec![0, 1, 2, 3, 4, 5],       // the last rows leave: nothing moves
            vec![7, 6, 5, 4, 3, 2, 1, 0], // a full reorder: a gather into the spare
            vec![4, 4, 0, 1],             // fewer rows, mostly moved: a gather too
        ] {
            let mut c = filled(8, 4, 6);
            c.next_pos
                .copy_(&Tensor::arange(8, (Kind::Int64, Device::Cpu)));
            let before = snapshot(&c);
            let ix = Tensor::from_slice(&idx);
            c.select_rows_from(&idx);
            assert_eq!(c.rows(), idx.len() as i64);
            for (t, b) in snapshot(&c).iter().zip(&before) {
                assert!(t.equal(&b.index_select(0, &ix)), "rows {idx:?}");
            }
            let pos: Vec<i64> = Vec::try_from(&c.next_pos).unwrap();
            assert_eq!(pos, idx);
            assert_eq!(c.row_room(), 8, "no buffer shrinks or grows");
        }
    }
}
