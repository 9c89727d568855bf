"""From a scan as the scanner gives it to model input, and back to the scan's own space.

``space`` (arrays with RAS affines <-> SimpleITK images, which are LPS), ``template`` (the
packaged MNI ICBM152 2009c head templates and brain mask, 2 mm), ``bias`` (N4), ``register``
(rigid/affine, mutual information), ``quality`` (is the registration usable?), ``pipeline``
(``Preprocessor``: the whole forward step and its inverse), ``cache`` (preprocessed training
and calibration scans, keyed by content and settings, so a folder is registered once).
"""
