"""Generated code of the `tandem` proto packages."""
