"""The Ascend NPU backend (Ascend 910 family) through torch-npu and CANN's fused operators."""
