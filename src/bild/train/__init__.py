"""Training: calibration data from the large model, distillation and agreement, text and prompt sources, and the
recipes of the shipped drafters (``bild little``, ``bild early-exit train``). Nothing at run time imports this package.

- :mod:`bild.train.sources`: real text on the machine (stdlib and package docstrings), split by module;
- :mod:`bild.train.prompts`: instruction prompts built from it;
- :mod:`bild.train.corpus`: broad text from Debian packages (dictionaries, manuals, fortunes, message catalogs),
  held out by source; :mod:`bild.train.tasks`: ten kinds of instruction prompt and raw passages built from it;
- :mod:`bild.train.align`: the large model's greedy outputs (calibration) and fine-tuning a small model on them;
- :mod:`bild.train.cost`: a drafter's decode step against the large model's, side by side;
- :mod:`bild.train.little`, :mod:`bild.train.early_exit`: the recipes of the default little models and the exit.
"""
