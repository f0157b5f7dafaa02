"""Train the embedded DiT-Digits/2 model on scikit-learn's digits and save it as safetensors.

Reproduce the committed weights/dit_digits.safetensors:
    python scripts/train_digits_dit.py --steps 4000 --seed 0 --out weights/dit_digits.safetensors
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.digits import IMAGE_SIZE, NUM_CLASSES, load_digits_images  # noqa: E402
from models.dit import DiT_models  # noqa: E402
from models.loading import save_dit  # noqa: E402
from models.train import train_dit  # noqa: E402


def main(args):
    torch.manual_seed(args.seed)
    model = DiT_models["DiT-Digits/2"](input_size=IMAGE_SIZE, num_classes=NUM_CLASSES, in_channels=1, learn_sigma=True)
    images, labels = load_digits_images()
    ema = train_dit(model, images, labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    command = f"python scripts/train_digits_dit.py --steps {args.steps} --seed {args.seed} --batch-size {args.batch_size} --lr {args.lr}"
    save_dit(ema, "DiT-Digits/2", args.out, extra={"command": command, "seed": str(args.seed)})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="weights/dit_digits.safetensors")
    main(parser.parse_args())
