//! Order-preserving data parallelism on scoped std threads (no thread pool, no extra crate).

/// Maps `f` over `items` on up to `available_parallelism()` threads and returns the results in
/// the order of `items`, so the output never depends on the number of threads.
///
/// The items are cut into one contiguous chunk per thread; a panic in `f` is re-raised here.
pub fn map_chunks<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    map_chunks_on(threads, items, f)
}

/// [`map_chunks`] on at most `threads` threads (at least one; never more than `items`).
pub fn map_chunks_on<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    // One chunk needs no thread (and an empty input spawns none).
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        // Joining in spawn order keeps the results in item order.
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    #[test]
    fn preserves_order() {
        let items: Vec<u64> = (0..1000).collect();
        let squares: Vec<u64> = items.iter().map(|x| x * x).collect();
        assert_eq!(map_chunks(&items, |x| x * x), squares);
        for threads in [1, 2, 3, 7, 16] {
            assert_eq!(map_chunks_on(threads, &items, |x| x * x), squares);
        }
    }

    #[test]
    fn empty_input() {
        let items: Vec<String> = Vec::new();
        assert!(map_chunks(&items, |s| s.len()).is_empty());
        assert!(map_chunks_on(8, &items, |s| s.len()).is_empty());
        assert!(map_chunks_on(0, &items, |s| s.len()).is_empty());
    }

    #[test]
    fn more_threads_than_items() {
        let items = ["a", "bb", "ccc"];
        assert_eq!(map_chunks_on(64, &items, |s| s.len()), vec![1, 2, 3]);
        // Zero threads is treated as one.
        assert_eq!(map_chunks_on(0, &items, |s| s.len()), vec![1, 2, 3]);
    }

    #[test]
    fn runs_on_several_threads() {
        let items: Vec<usize> = (0..8).collect();
        let seen = Mutex::new(HashSet::new());
        map_chunks_on(4, &items, |_| {
            seen.lock().unwrap().insert(std::thread::current().id());
        });
        assert_eq!(seen.into_inner().unwrap().len(), 4);
    }

    #[test]
    #[should_panic(expected = "item 5")]
    fn propagates_panics() {
        let items: Vec<usize> = (0..10).collect();
        map_chunks_on(3, &items, |&i| {
            if i == 5 {
                panic!("item 5");
            }
        });
    }
}
