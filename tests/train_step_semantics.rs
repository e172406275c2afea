//! How the pieces compose in one optimizer step, as the trainer uses them: loss scaling, unscale + overflow check,
//! skipping the AdamW step on overflow, scale update, and the group learning rates from the plateau scheduler and
//! the unfreezing stage.

use derma::train::adamw::{AdamW, AdamWConfig, ParamSlot};
use derma::train::plateau::{PlateauConfig, ReduceLrOnPlateau};
use derma::train::scaler::{GradScaler, GradScalerConfig};
use derma::train::unfreeze::UnfreezeSchedule;

#[test]
fn overflowing_step_is_skipped_entirely() {
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let mut scaler = GradScaler::new(GradScalerConfig { growth_interval: 2, ..Default::default() }).unwrap();
    let mut w = vec![1.0f32, -1.0];
    // True gradients; the backward pass produces them multiplied by the scale. Step 2 overflows.
    let true_grads = [[0.5f32, -0.25], [f32::INFINITY, 0.1], [0.5, -0.25], [0.5, -0.25]];
    let mut snapshots = Vec::new();
    for g in true_grads {
        let s = scaler.scale();
        let mut grad: Vec<f32> = g.iter().map(|x| x * s).collect();
        let found_inf = scaler.unscale_and_check(&mut [&mut grad]);
        if !found_inf {
            // Unscaled gradient equals the true one exactly (the scale is a power of two).
            assert_eq!(grad, g.to_vec());
            opt.step(&mut [ParamSlot { name: "w", param: &mut w, grad: &grad, lr: 1e-3 }]).unwrap();
        }
        scaler.update(found_inf);
        snapshots.push((w.clone(), opt.state("w").map(|s| s.step), scaler.scale()));
    }
    // The overflowing step changed neither the weights nor the step count; it halved the scale.
    assert_eq!(snapshots[1].0, snapshots[0].0);
    assert_eq!(snapshots[1].1, Some(1));
    assert_eq!(snapshots[1].2, 32768.0);
    // Two clean steps after the overflow grow the scale back (growth_interval 2).
    assert_eq!(snapshots[3].1, Some(3));
    assert_eq!(snapshots[3].2, 65536.0);
}

#[test]
fn group_learning_rates_from_plateau_and_stage() {
    let schedule = UnfreezeSchedule::default();
    let mut plateau = ReduceLrOnPlateau::new(PlateauConfig::default(), &[5e-5]).unwrap();
    // Flat validation accuracy from epoch 0: cuts at epochs 6, 12, 18, ... (0-based), i.e. every 6th epoch.
    let mut rows = Vec::new();
    for epoch in 0..25usize {
        let stage = schedule.stage_for_epoch(epoch);
        let head_lr = plateau.lr();
        let backbone_lr = schedule.stages()[stage.index].backbone_lr(head_lr);
        rows.push((epoch, head_lr, backbone_lr, stage.frozen_blocks));
        plateau.step(0.7);
    }
    assert_eq!(rows[0], (0, 5e-5, 5e-5, 7));
    assert_eq!(rows[6].1, 5e-5);
    assert_eq!(rows[7].1, 2.5e-5);
    assert_eq!(rows[13].1, 1.25e-5);
    assert_eq!(rows[19].1, 6.25e-6);
    // Epoch 20: second stage, backbone at half the (already reduced) head rate.
    assert_eq!(rows[20], (20, 6.25e-6, 3.125e-6, 5));
}
