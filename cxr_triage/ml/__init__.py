"""The model and its pixels: the network (``model``), its files (``checkpoint``), the pixel pipeline
(``preprocess``, ``imaging``), batched inference (``inference``, ``precision``), the typicality gate (``gate``),
the model registry (``registry``), the shipping rule that decides whether a challenger replaces the champion
(``decision``) and the worker's current champion (``modelstore``). The training package may import this room (and
the package's ground floor) and nothing else of the runtime.
"""
