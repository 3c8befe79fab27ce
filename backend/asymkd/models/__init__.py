"""Models: timm backbones with feature maps, cross-modal attention, losses, model files."""
