//! The FLOP counts behind emulated compute rates are Legion's own: the sums of stage
//! FLOPs of the imported models (what `legion inspect` reports).

use legion_runtime::emulate::{DEVICE_RATE_FLOPS, DEVICE_RATE_MODEL, VGG16_FLOPS};

fn total_flops(name: &str) -> u64 {
    let path = legion_models::test_model(name).unwrap();
    let ir = legion_ir::import(&path, None).unwrap();
    ir.stages.iter().map(|s| s.flops).sum()
}

#[test]
fn vgg16_flops_is_the_imported_total() {
    assert_eq!(total_flops("vgg16") as f64, VGG16_FLOPS);
}

#[test]
fn device_rate_flops_is_the_imported_total() {
    assert_eq!(total_flops(DEVICE_RATE_MODEL) as f64, DEVICE_RATE_FLOPS);
}
