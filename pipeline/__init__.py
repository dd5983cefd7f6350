"""The offline pipeline: uro's database -> training -> model store -> registry -> batch
recommendations, and the direct event writer. Needs the `pipeline` extra."""
