"""Detection without training: the word scan (``word_scan``: every vocabulary token, and phrases
of neutral words), the trigger inversion (``inversion``: a soft trigger of several tokens) and
the scan's verdict per label (``verdict``), with a clean control that tells a trigger from a
natural feature of the task when the clean pre-trained weights are given (``control``), behind ``mitigate scan`` and MBTSAD's unlearning."""

from mitigate.mitigations.detection.control import CleanControl
from mitigate.mitigations.detection.inversion import TriggerInversion, invert_triggers
from mitigate.mitigations.detection.verdict import scan_checkpoint, trigger_flip_rates, verdict_lines
from mitigate.mitigations.detection.word_scan import Suspect, TriggerScan, scan_vocabulary

__all__ = ["CleanControl", "Suspect", "TriggerInversion", "TriggerScan", "invert_triggers", "scan_checkpoint", "scan_vocabulary",
           "trigger_flip_rates", "verdict_lines"]
