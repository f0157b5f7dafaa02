"""Train the digits classifier (sample-class checks, FID feature network) and save it as safetensors.

Reproduce the committed vq4dit/weights/digits_classifier.safetensors:
    python scripts/train_digits_classifier.py --epochs 30 --seed 0 --out vq4dit/weights/digits_classifier.safetensors
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq4dit.evaluation.classifier import accuracy, save_classifier, train_classifier  # noqa: E402
from vq4dit.models.digits import load_digits_images, split_indices  # noqa: E402


def main(args):
    images, labels = load_digits_images()
    train_idx, test_idx = split_indices(len(images), seed=0)
    model = train_classifier(images[train_idx], labels[train_idx], epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed)
    test_acc = accuracy(model, images[test_idx], labels[test_idx])
    train_acc = accuracy(model, images[train_idx], labels[train_idx])
    print(f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} ({len(test_idx)} held-out digits)")
    command = (f"python scripts/train_digits_classifier.py --epochs {args.epochs} --batch-size {args.batch_size} "
               f"--lr {args.lr} --seed {args.seed}")
    save_classifier(model, args.out, {"command": command, "seed": str(args.seed), "test_accuracy": f"{test_acc:.4f}",
                                      "split": "models.digits.split_indices(1797, seed=0)"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="vq4dit/weights/digits_classifier.safetensors")
    main(parser.parse_args())
