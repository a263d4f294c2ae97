"""A Label Studio project's labelling config: the tags a SAM backend reads and answers.

The config is XML (``<View>`` with object tags such as ``<Image name="image" value="$image"/>`` and control tags
such as ``<BrushLabels name="tag" toName="image">`` holding ``<Label value="Car"/>``). The backend answers clicks
made with ``KeyPointLabels`` and boxes drawn with ``RectangleLabels`` by a ``BrushLabels`` mask on the same image.
Parsed with the standard library; documents with a DTD or entities are refused (entity expansion).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

CONTROL_TAGS = ("brushlabels", "keypointlabels", "rectanglelabels")


@dataclass(frozen=True)
class ControlTag:
    """One control tag: its kind (a lower-case tag name), name, the object tag it labels and its label values."""

    kind: str
    name: str
    to_name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelConfig:
    """The images (object tag name -> task data key) and the control tags a SAM backend uses."""

    images: dict[str, str]
    controls: tuple[ControlTag, ...]

    def brush_for(self, image_name: str) -> ControlTag:
        """The BrushLabels tag that labels this image (the first one, if several)."""
        for control in self.controls:
            if control.kind == "brushlabels" and control.to_name == image_name:
                return control
        raise ValueError(f"the labelling config has no BrushLabels tag with toName={image_name!r}: add one to get "
                         "masks for that image")

    def control(self, name: str) -> ControlTag | None:
        return next((c for c in self.controls if c.name == name), None)

    def describe(self) -> dict:
        """The JSON ``/setup`` answers with: what this backend will read and write."""
        return {"images": self.images,
                "controls": [{"type": c.kind, "name": c.name, "to_name": c.to_name, "labels": list(c.labels)}
                             for c in self.controls]}


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a labelling config; ValueError names what is wrong (not XML, no image, no BrushLabels tag)."""
    if not isinstance(xml, str) or not xml.strip():
        raise ValueError("the labelling config is empty: expected Label Studio's XML (<View>...</View>)")
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise ValueError("the labelling config holds a DTD or entities, which this backend does not read")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"the labelling config is not well-formed XML: {exc}") from None
    images: dict[str, str] = {}
    controls = []
    for element in root.iter():
        kind = element.tag.lower() if isinstance(element.tag, str) else ""
        if kind == "image":
            name, value = element.get("name"), element.get("value", "")
            if not name or not value.startswith("$") or len(value) < 2:
                raise ValueError(f'an <Image> tag needs name="..." and value="$field", got name={name!r} '
                                 f"value={value!r}")
            images[name] = value[1:]
        elif kind in CONTROL_TAGS:
            name, to_name = element.get("name"), element.get("toName")
            if not name or not to_name:
                raise ValueError(f"<{element.tag}> needs name and toName attributes, got name={name!r} "
                                 f"toName={to_name!r}")
            labels = tuple(label.get("value", "") for label in element if str(label.tag).lower() == "label")
            controls.append(ControlTag(kind, name, to_name, labels))
    if not images:
        raise ValueError('the labelling config has no <Image name="..." value="$field"/> tag')
    if not any(c.kind == "brushlabels" and c.to_name in images for c in controls):
        raise ValueError("the labelling config has no <BrushLabels> tag whose toName is one of its images "
                         f"({', '.join(images)}): the masks have nowhere to go")
    return LabelConfig(images, tuple(controls))
