//! The batching policy, apart from any model: which queued requests start now (by priority,
//! then arrival), which leave
//! unanswered (deadline passed, client gone), how long the worker may wait to fill an encoder
//! batch, and how many may queue. Pure logic over [`Schedulable`] jobs, so it is unit-tested
//! without tch (the worker in `worker.rs` applies it to real tensors).
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Scheduling knobs (from `[inference]`).
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most images encoded in one CLIP forward pass.
    pub max_batch_images: usize,
    /// How long an idle worker waits for more images after the first one.
    pub max_batch_delay: Duration,
    /// Let new requests join a running decode at step boundaries.
    pub continuous: bool,
    /// Most images being decoded at once.
    pub max_running_images: usize,
    /// Most GPT-2 rows (images × beams or samples) being decoded at once (0 = no limit): on
    /// the CPU a step's cost per row grows past a batch size, so admission keeps the decode
    /// batch at its efficient size whatever the requests' beam widths.
    pub max_running_rows: usize,
    /// Most requests waiting (queued, not started) before new ones are refused.
    pub queue_capacity: usize,
    /// Most bytes the running requests' KV caches may take (0 = no limit): admission counts
    /// rows × capacity, not images.
    pub kv_budget_bytes: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_images: 32,
            max_batch_delay: Duration::from_millis(2),
            continuous: true,
            max_running_images: 64,
            max_running_rows: 0,
            queue_capacity: 1024,
            kv_budget_bytes: 0,
        }
    }
}

/// What the policy needs to know about a request.
pub trait Schedulable {
    fn images(&self) -> usize;
    /// GPT-2 rows the request decodes (images × beams or samples).
    fn rows(&self) -> usize {
        self.images()
    }
    fn deadline(&self) -> Option<Instant>;
    /// The caller went away (cancelled, or its reply channel closed).
    fn abandoned(&self) -> bool;
    /// Lower starts first (as vLLM and Triton order it); equal priorities keep arrival order.
    fn priority(&self) -> i32 {
        0
    }
    /// Bytes of KV cache the request needs while it decodes.
    fn kv_bytes(&self) -> u64 {
        0
    }
}

/// Why a request left without captions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reaped {
    Deadline,
    Cancelled,
}

impl Reaped {
    /// The outcome label of `clipcap_images_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reaped::Deadline => "deadline",
            Reaped::Cancelled => "cancelled",
        }
    }
}

/// Whether a queued or running request should be dropped now, and why. A passed deadline wins
/// over a closed channel (the handler closes it when its own deadline fires).
pub fn reap_reason(job: &impl Schedulable, now: Instant) -> Option<Reaped> {
    if job.deadline().is_some_and(|d| now >= d) {
        Some(Reaped::Deadline)
    } else if job.abandoned() {
        Some(Reaped::Cancelled)
    } else {
        None
    }
}

/// Bounds the requests waiting for the worker. Callers take a slot before queuing and the
/// worker gives it back when the request starts or is reaped; shared between threads.
#[derive(Debug)]
pub struct Admission {
    capacity: usize,
    queued: AtomicUsize,
}

impl Admission {
    pub fn new(capacity: usize) -> Self {
        Admission {
            capacity: capacity.max(1),
            queued: AtomicUsize::new(0),
        }
    }

    /// Takes a slot, or `false` when `capacity` requests are already waiting.
    pub fn try_admit(&self) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.capacity).then_some(q + 1)
            })
            .is_ok()
    }

    /// Gives `n` slots back.
    pub fn release(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// The queue of requests that have reached the worker but not started.
pub struct Scheduler<J> {
    cfg: SchedulerConfig,
    pending: VecDeque<J>,
}

impl<J: Schedulable> Scheduler<J> {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            cfg,
            pending: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request behind every request of its priority or a more urgent one.
    pub fn push(&mut self, job: J) {
        let p = job.priority();
        let at = self.pending.partition_point(|q| q.priority() <= p);
        self.pending.insert(at, job);
    }

    pub fn pending_jobs(&self) -> usize {
        self.pending.len()
    }

    pub fn pending_images(&self) -> usize {
        self.pending.iter().map(|j| j.images()).sum()
    }

    /// Whether the worker should look for new requests: always when idle; while a decode runs
    /// only with continuous batching (static batches wait for the running one to finish).
    pub fn takes_new_work(&self, decoding: bool) -> bool {
        !decoding || self.cfg.continuous
    }

    /// How long the worker may wait for more requests to fill the encoder batch: never while
    /// a decode is running (its next step is due), `max_batch_delay` when idle.
    pub fn gather_window(&self, decoding: bool) -> Duration {
        if decoding {
            Duration::ZERO
        } else {
            self.cfg.max_batch_delay
        }
    }

    /// Whether the encoder batch still has room for more waiting images.
    pub fn wants_more(&self) -> bool {
        self.pending_images() < self.cfg.max_batch_images
    }

    /// Removes every queued request whose deadline passed or whose caller left, in order.
    pub fn reap(&mut self, now: Instant) -> Vec<(J, Reaped)> {
        let mut gone = vec![];
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for job in self.pending.drain(..) {
            match reap_reason(&job, now) {
                Some(r) => gone.push((job, r)),
                None => kept.push_back(job),
            }
        }
        self.pending = kept;
        gone
    }

    /// The requests to start now, most urgent first, then first come first served, and whole:
    /// as many as keep the
    /// running images within `max_running_images` and this encoder batch within
    /// `max_batch_images`. A request larger than either limit starts alone on an idle worker
    /// (it would never fit otherwise). The first request that does not fit stops the batch, so
    /// a large request is never overtaken forever by small ones.
    /// `running_rows`: the running requests' GPT-2 rows, against `max_running_rows`;
    /// `running_kv_bytes`: what the running requests' caches hold, against `kv_budget_bytes`.
    pub fn next_batch(
        &mut self,
        running_images: usize,
        running_rows: usize,
        running_kv_bytes: u64,
    ) -> Vec<J> {
        let mut room = self.cfg.max_running_images.saturating_sub(running_images);
        let max_rows = self.cfg.max_running_rows;
        let mut rows = running_rows;
        let budget = self.cfg.kv_budget_bytes;
        let mut kv = running_kv_bytes;
        let mut batch: Vec<J> = vec![];
        let mut batch_images = 0;
        while let Some(job) = self.pending.front() {
            let n = job.images();
            let alone_on_idle = batch.is_empty() && running_images == 0;
            let fits_running = n <= room || alone_on_idle;
            let fits_batch = batch.is_empty() || batch_images + n <= self.cfg.max_batch_images;
            let fits_kv = budget == 0 || kv + job.kv_bytes() <= budget || alone_on_idle;
            let fits_rows = max_rows == 0 || rows + job.rows() <= max_rows || alone_on_idle;
            if !fits_running || !fits_batch || !fits_kv || !fits_rows {
                break;
            }
            room = room.saturating_sub(n);
            rows += job.rows();
            batch_images += n;
            kv += job.kv_bytes();
            batch.push(self.pending.pop_front().unwrap());
        }
        batch
    }

    /// Iterates over the queued requests in the order they will start.
    pub fn iter(&self) -> impl Iterator<Item = &J> {
        self.pending.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Job {
        id: u32,
        images: usize,
        deadline: Option<Instant>,
        abandoned: bool,
        priority: i32,
        kv: u64,
        rows: usize,
    }

    impl Schedulable for Job {
        fn images(&self) -> usize {
            self.images
        }
        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
        fn abandoned(&self) -> bool {
            self.abandoned
        }
        fn priority(&self) -> i32 {
            self.priority
        }
        fn kv_bytes(&self) -> u64 {
            self.kv
        }
        fn rows(&self) -> usize {
            self.rows
        }
    }

    fn job(id: u32, images: usize) -> Job {
        Job {
            id,
            images,
            deadline: None,
            abandoned: false,
            priority: 0,
            kv: 0,
            rows: images,
        }
    }

    #[test]
    fn the_row_cap_bounds_what_joins_by_beam_rows_not_images() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_running_rows: 20,
            ..Default::default()
        });
        // Beam 5 (5 rows), greedy (1 row), beam 8 (8 rows), greedy.
        for (id, rows) in [(1, 5), (2, 1), (3, 8), (4, 1)] {
            s.push(Job { rows, ..job(id, 1) });
        }
        // 10 rows running: 5 + 1 fit in the 10 left, the 8 behind them does not (16 + 8 > 20),
        // and the greedy one behind it waits its turn.
        assert_eq!(ids(&s.next_batch(2, 10, 0)), vec![1, 2]);
        assert!(s.next_batch(4, 16, 0).is_empty());
        assert_eq!(ids(&s.next_batch(3, 11, 0)), vec![3, 4]);
        // A request wider than the cap starts alone on an idle worker.
        s.push(Job {
            rows: 40,
            ..job(5, 1)
        });
        assert!(s.next_batch(1, 1, 0).is_empty());
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![5]);
    }

    #[test]
    fn the_kv_budget_bounds_what_joins_by_bytes_not_images() {
        let mut s = Scheduler::new(SchedulerConfig {
            kv_budget_bytes: 100,
            ..Default::default()
        });
        for (id, kv) in [(1, 60), (2, 30), (3, 20), (4, 5)] {
            s.push(Job { kv, ..job(id, 1) });
        }
        // 60 + 30 fit in 100; 20 more would not, and the 5 behind it waits its turn.
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![1, 2]);
        assert!(s.next_batch(2, 2, 90).is_empty());
        assert_eq!(ids(&s.next_batch(1, 1, 30)), vec![3, 4]);
        // A request over the whole budget starts alone on an idle worker (the doors refuse
        // those before they queue).
        s.push(Job {
            kv: 500,
            ..job(5, 1)
        });
        assert!(s.next_batch(1, 1, 10).is_empty());
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![5]);
    }

    fn urgent(id: u32, images: usize, priority: i32) -> Job {
        Job {
            priority,
            ..job(id, images)
        }
    }

    #[test]
    fn lower_priority_values_start_first_and_ties_keep_arrival_order() {
        let mut s = sched(2, 100);
        s.push(job(1, 1));
        s.push(urgent(2, 1, 5));
        s.push(urgent(3, 1, -1));
        s.push(job(4, 1));
        s.push(urgent(5, 1, -1));
        s.push(urgent(6, 1, 5));
        let order: Vec<u32> = s.iter().map(|j| j.id).collect();
        assert_eq!(order, vec![3, 5, 1, 4, 2, 6]);
        // Batches of two images, most urgent first.
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![3, 5]);
        // A late urgent request overtakes everything still waiting.
        s.push(urgent(7, 1, -9));
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![7, 1]);
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![4, 2]);
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![6]);
    }

    #[test]
    fn an_urgent_request_that_does_not_fit_is_not_overtaken_by_a_later_small_one() {
        let mut s = sched(32, 4);
        s.push(urgent(1, 3, -1));
        s.push(job(2, 1));
        // 2 images running: the urgent 3 does not fit, and the 1 behind it waits too.
        assert!(s.next_batch(2, 2, 0).is_empty());
        assert_eq!(ids(&s.next_batch(1, 1, 0)), vec![1]);
    }

    #[test]
    fn a_request_whose_deadline_passes_in_the_queue_leaves_uncomputed() {
        let t0 = Instant::now();
        let mut s = sched(32, 64);
        s.push(Job {
            deadline: Some(t0 + Duration::from_millis(5)),
            ..urgent(1, 1, -5)
        });
        s.push(job(2, 1));
        let gone = s.reap(t0 + Duration::from_millis(5));
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].0.id, gone[0].1), (1, Reaped::Deadline));
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![2]);
    }

    fn sched(max_batch: usize, max_running: usize) -> Scheduler<Job> {
        Scheduler::new(SchedulerConfig {
            max_batch_images: max_batch,
            max_running_images: max_running,
            ..Default::default()
        })
    }

    fn ids(jobs: &[Job]) -> Vec<u32> {
        jobs.iter().map(|j| j.id).collect()
    }

    #[test]
    fn batches_are_fifo_and_bounded_by_max_batch_images() {
        let mut s = sched(8, 100);
        for (id, n) in [(1, 3), (2, 4), (3, 2), (4, 1)] {
            s.push(job(id, n));
        }
        // 3 + 4 fit in 8; adding 2 would make 9.
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![1, 2]);
        assert_eq!(ids(&s.next_batch(7, 7, 0)), vec![3, 4]);
        assert!(s.next_batch(10, 10, 0).is_empty());
    }

    #[test]
    fn running_images_bound_what_joins() {
        let mut s = sched(32, 10);
        s.push(job(1, 4));
        s.push(job(2, 1));
        // 7 running: 4 does not fit in the 3 left, and the 1 behind it waits its turn.
        assert!(s.next_batch(7, 7, 0).is_empty());
        assert_eq!(s.pending_jobs(), 2);
        assert_eq!(ids(&s.next_batch(6, 6, 0)), vec![1]);
        assert_eq!(ids(&s.next_batch(10, 10, 0)), Vec::<u32>::new());
        assert_eq!(ids(&s.next_batch(9, 9, 0)), vec![2]);
    }

    #[test]
    fn an_oversized_request_starts_alone_on_an_idle_worker() {
        let mut s = sched(4, 6);
        s.push(job(1, 9));
        s.push(job(2, 1));
        assert!(s.next_batch(1, 1, 0).is_empty(), "never while others run");
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![1]);
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![2]);
    }

    #[test]
    fn reaping_drops_expired_and_abandoned_requests_and_keeps_order() {
        let t0 = Instant::now();
        let mut s = sched(32, 64);
        s.push(Job {
            deadline: Some(t0 + Duration::from_millis(10)),
            ..job(1, 1)
        });
        s.push(job(2, 1));
        s.push(Job {
            abandoned: true,
            ..job(3, 1)
        });
        s.push(Job {
            deadline: Some(t0 + Duration::from_millis(50)),
            abandoned: true,
            ..job(4, 1)
        });
        s.push(job(5, 2));
        // Before any deadline only the abandoned ones go.
        let gone = s.reap(t0);
        let got: Vec<_> = gone.iter().map(|(j, r)| (j.id, *r)).collect();
        assert_eq!(got, vec![(3, Reaped::Cancelled), (4, Reaped::Cancelled)]);
        let gone = s.reap(t0 + Duration::from_millis(10));
        let got: Vec<_> = gone.iter().map(|(j, r)| (j.id, *r)).collect();
        assert_eq!(got, vec![(1, Reaped::Deadline)]);
        assert_eq!(ids(&s.next_batch(0, 0, 0)), vec![2, 5]);
    }

    #[test]
    fn a_passed_deadline_is_reported_as_deadline_even_if_the_caller_left() {
        let t0 = Instant::now();
        let j = Job {
            deadline: Some(t0),
            abandoned: true,
            ..job(1, 1)
        };
        assert_eq!(reap_reason(&j, t0), Some(Reaped::Deadline));
        assert_eq!(reap_reason(&job(2, 1), t0), None);
    }

    #[test]
    fn static_batches_take_no_work_while_decoding_and_never_wait_then() {
        let mut s = sched(8, 64);
        assert!(s.takes_new_work(false) && s.takes_new_work(true));
        assert_eq!(s.gather_window(true), Duration::ZERO);
        assert_eq!(s.gather_window(false), Duration::from_millis(2));
        s.cfg.continuous = false;
        assert!(s.takes_new_work(false) && !s.takes_new_work(true));
        s.push(job(1, 7));
        assert!(s.wants_more());
        s.push(job(2, 1));
        assert!(
            !s.wants_more(),
            "8 waiting images fill an encoder batch of 8"
        );
    }

    #[test]
    fn admission_bounds_the_queue() {
        let a = Admission::new(2);
        assert!(a.try_admit() && a.try_admit());
        assert!(!a.try_admit(), "a third request waits beyond capacity");
        assert_eq!(a.queued(), 2);
        a.release(1);
        assert!(a.try_admit());
        a.release(5);
        assert_eq!(a.queued(), 0, "never below zero");
    }
}
