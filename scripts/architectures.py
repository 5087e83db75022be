"""Write the README's list of architectures and docs/architectures.md from the architecture
matrix (flashhead_mlx/testing/architectures.py); tests/test_architectures.py checks both."""

from pathlib import Path

from flashhead_mlx.testing.architectures import README_BEGIN, README_END, matrix_page, readme_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(README_BEGIN), readme.index(README_END) + len(README_END)
    (ROOT / "README.md").write_text(readme[:start] + readme_section() + readme[end:])
    (ROOT / "docs" / "architectures.md").write_text(matrix_page())


if __name__ == "__main__":
    main()
