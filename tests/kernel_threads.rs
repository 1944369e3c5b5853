//! clipcap's C++ kernels (int8 GEMM, one-query attention, beam candidates, sampling) split
//! their loops over their own spinning threads (`src/model/pool.cpp`). Until session 15 they
//! were compiled without OpenMP, so `at::parallel_for` ran every loop on one thread; these
//! tests pin the thread count to libtorch's setting and check that sharing the pool between
//! callers changes no result. A binary of its own: the thread count is process-wide.

use clipcap::model::int8::{kernel_threads, Int8Engine, Int8Matrix};
use tch::{Device, Kind, Tensor};

#[test]
fn kernels_split_their_loops_over_libtorchs_intra_op_threads_and_share_them_safely() {
    let before = clipcap::device::threads();
    for n in [1, 2, 3] {
        clipcap::device::set_threads(n);
        assert_eq!(kernel_threads(), n, "libtorch set to {n} threads");
    }
    clipcap::device::set_threads(2);

    // Four callers at once: one holds the pool, the others run their loops inline. Every
    // product must equal the one computed alone, bit for bit, however the turns fell.
    tch::manual_seed(7);
    let w = Tensor::randn([384, 256], (Kind::Float, Device::Cpu));
    let m = Int8Matrix::new(Int8Engine::Clipcap, &w).unwrap();
    let inputs: Vec<Tensor> = (0..4)
        .map(|_| Tensor::randn([5, 256], (Kind::Float, Device::Cpu)))
        .collect();
    let alone: Vec<Tensor> = inputs.iter().map(|x| m.linear(x, None)).collect();
    let handles: Vec<_> = inputs
        .into_iter()
        .zip(alone)
        .map(|(x, want)| {
            // Each caller packs its own copy (the same bytes): Int8Matrix is not Sync.
            let w = w.shallow_clone();
            std::thread::spawn(move || {
                let m = Int8Matrix::new(Int8Engine::Clipcap, &w).unwrap();
                for _ in 0..200 {
                    assert!(
                        m.linear(&x, None).equal(&want),
                        "a product changed under sharing"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a caller panicked");
    }
    clipcap::device::set_threads(before);
}
