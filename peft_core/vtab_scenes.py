"""The SUN397 image tree ``prepare-vtab`` reads (peft_core/vtab_archives.py has the other image folders).

- ``sun397-folder`` (sun397, ``SUN397.tar.gz``): ``SUN397/<letter>/<class>[/<sub>]/sun_*.jpg``
  and TFDS's split lists ``sun397_tfds_tr.txt``, ``sun397_tfds_va.txt``, ``sun397_tfds_te.txt``
  (lines ``/<letter>/<class>[/<sub>]/<file>.jpg``: the image's path below ``SUN397/``), which the
  archive lacks: TFDS ships them in its package (``tensorflow_datasets/image_classification/``);
  ``--source`` is the folder holding the three lists and ``SUN397/`` (or ``SUN397/`` itself, the lists
  inside it). As TFDS's sun397 builder, config ``tfds`` (version 4.0.0): tr -> train, va ->
  validation, te -> test (its description: 76,128 / 10,875 / 21,750 images); the label is the line's
  folder (``/c/car_interior/backseat``), its id that folder's position in TFDS's ``sun397_labels.txt``
  (the 397 folders, sorted: :data:`SUN397_CLASSES`). Only listed images are read (TFDS too yields an
  archive file only if a list names it); each split in :data:`vtab_archives.ORDER` of the listed path
  without its leading ``/`` (``c/car_interior/backseat/sun_x.jpg``, relative to ``SUN397/``).

Images. TFDS decodes each file with OpenCV (``imdecode`` flag 3: three channels; SUN397 holds GIF,
PNG and BMP data in some ``.jpg`` files), shrinks those above 120,000 pixels (``cv2.resize`` by
``sqrt(120000 / (h * w))``, bilinear) and re-encodes every image as JPEG (``cv2.imencode`` with no
quality argument for ``tfds``: OpenCV's default 95, though the config's description says 72). Here
nothing is resized or re-encoded that way: the PNG encoding stores Pillow's decoding of each file at
its native size (grayscale kept as L, as for every format; the cache step resizes and converts),
``--image-encoding source`` each file's own bytes, except files holding neither JPEG nor PNG data,
which are decoded and stored as PNG (listed in the manifest, ``decoded_to_png``). The pixels are
therefore not TFDS's, even for the same image; the manifest records both rules.

Skipped images. The builder cited defines ``_SUN397_IGNORE_IMAGES``
(``SUN397/c/church/outdoor/sun_bhenjvsvrtumjuri.jpg``) but its ``tfds`` config does not apply it;
TFDS's later builder (``tensorflow_datasets/datasets/sun397/sun397_dataset_builder.py``, same
version 4.0.0) skips that image and ``SUN397/t/track/outdoor/sun_aophkoiosslinihb.jpg``
(reported in tensorflow/datasets issue 2889 as not decodable by TensorFlow). Here every listed
image is read; one Pillow cannot read is refused naming it (drop its line from the list: the lists'
sha256 are recorded).

(tensorflow/datasets at commit 003210498afdd2621dd0b4a2de2a83488e94d2c0,
``tensorflow_datasets/image_classification/sun.py``, class ``Sun397``; ``sun397_labels.txt`` beside it.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import InputError
from .vtab_archives import LAYOUTS, Item, Source, _lines, _order_key, decode_image, image_source

SUN397_LISTS = {"train": "sun397_tfds_tr.txt", "validation": "sun397_tfds_va.txt", "test": "sun397_tfds_te.txt"}
# sun397_labels.txt (TFDS's ClassLabel names_file; label = its line number - 1): the 397 folders below
# SUN397/, sorted, each under the folder of its first letter ("/a/abbey"); written here without that
# "/<letter>/" prefix. sha256 of the file (lines joined with "\n", one after the last):
SUN397_LABELS_SHA256 = "5e24094d43e7ccec1cdb540f574a3a82de9f458a1bf681e3557d3c167123b594"
SUN397_CLASSES = tuple(f"/{name[0]}/{name}" for name in (
    "abbey airplane_cabin airport_terminal alley amphitheater amusement_arcade amusement_park anechoic_chamber "
    "apartment_building/outdoor apse/indoor aquarium aqueduct arch archive arrival_gate/outdoor art_gallery "
    "art_school art_studio assembly_line athletic_field/outdoor atrium/public attic auditorium auto_factory "
    "badlands badminton_court/indoor baggage_claim bakery/shop balcony/exterior balcony/interior ball_pit ballroom "
    "bamboo_forest banquet_hall bar barn barndoor baseball_field basement basilica basketball_court/outdoor "
    "bathroom batters_box bayou bazaar/indoor bazaar/outdoor beach beauty_salon bedroom berth biology_laboratory "
    "bistro/indoor boardwalk boat_deck boathouse bookstore booth/indoor botanical_garden bow_window/indoor "
    "bow_window/outdoor bowling_alley boxing_ring brewery/indoor bridge building_facade bullring burial_chamber "
    "bus_interior butchers_shop butte cabin/outdoor cafeteria campsite campus canal/natural canal/urban candy_store "
    "canyon car_interior/backseat car_interior/frontseat carrousel casino/indoor castle catacomb cathedral/indoor "
    "cathedral/outdoor cavern/indoor cemetery chalet cheese_factory chemistry_lab chicken_coop/indoor "
    "chicken_coop/outdoor childs_room church/indoor church/outdoor classroom clean_room cliff cloister/indoor "
    "closet clothing_store coast cockpit coffee_shop computer_room conference_center conference_room "
    "construction_site control_room control_tower/outdoor corn_field corral corridor cottage_garden courthouse "
    "courtroom courtyard covered_bridge/exterior creek crevasse crosswalk cubicle/office dam delicatessen "
    "dentists_office desert/sand desert/vegetation diner/indoor diner/outdoor dinette/home dinette/vehicle "
    "dining_car dining_room discotheque dock doorway/outdoor dorm_room driveway driving_range/outdoor drugstore "
    "electrical_substation elevator/door elevator/interior elevator_shaft engine_room escalator/indoor excavation "
    "factory/indoor fairway fastfood_restaurant field/cultivated field/wild fire_escape fire_station "
    "firing_range/indoor fishpond florist_shop/indoor food_court forest/broadleaf forest/needleleaf forest_path "
    "forest_road formal_garden fountain galley game_room garage/indoor garbage_dump gas_station gazebo/exterior "
    "general_store/indoor general_store/outdoor gift_shop golf_course greenhouse/indoor greenhouse/outdoor "
    "gymnasium/indoor hangar/indoor hangar/outdoor harbor hayfield heliport herb_garden highway hill home_office "
    "hospital hospital_room hot_spring hot_tub/outdoor hotel/outdoor hotel_room house hunting_lodge/outdoor "
    "ice_cream_parlor ice_floe ice_shelf ice_skating_rink/indoor ice_skating_rink/outdoor iceberg igloo "
    "industrial_area inn/outdoor islet jacuzzi/indoor jail/indoor jail_cell jewelry_shop kasbah kennel/indoor "
    "kennel/outdoor kindergarden_classroom kitchen kitchenette labyrinth/outdoor lake/natural landfill landing_deck "
    "laundromat lecture_room library/indoor library/outdoor lido_deck/outdoor lift_bridge lighthouse "
    "limousine_interior living_room lobby lock_chamber locker_room mansion manufactured_home market/indoor "
    "market/outdoor marsh martial_arts_gym mausoleum medina moat/water monastery/outdoor mosque/indoor "
    "mosque/outdoor motel mountain mountain_snowy movie_theater/indoor museum/indoor music_store music_studio "
    "nuclear_power_plant/outdoor nursery oast_house observatory/outdoor ocean office office_building "
    "oil_refinery/outdoor oilrig operating_room orchard outhouse/outdoor pagoda palace pantry park "
    "parking_garage/indoor parking_garage/outdoor parking_lot parlor pasture patio pavilion pharmacy phone_booth "
    "physics_laboratory picnic_area pilothouse/indoor planetarium/outdoor playground playroom plaza podium/indoor "
    "podium/outdoor pond poolroom/establishment poolroom/home power_plant/outdoor promenade_deck pub/indoor pulpit "
    "putting_green racecourse raceway raft railroad_track rainforest reception recreation_room "
    "residential_neighborhood restaurant restaurant_kitchen restaurant_patio rice_paddy riding_arena river "
    "rock_arch rope_bridge ruin runway sandbar sandbox sauna schoolhouse sea_cliff server_room shed shoe_shop "
    "shopfront shopping_mall/indoor shower skatepark ski_lodge ski_resort ski_slope sky skyscraper slum snowfield "
    "squash_court stable stadium/baseball stadium/football stage/indoor staircase street subway_interior "
    "subway_station/platform supermarket sushi_bar swamp swimming_pool/indoor swimming_pool/outdoor "
    "synagogue/indoor synagogue/outdoor television_studio temple/east_asia temple/south_asia tennis_court/indoor "
    "tennis_court/outdoor tent/outdoor theater/indoor_procenium theater/indoor_seats thriftshop throne_room "
    "ticket_booth toll_plaza topiary_garden tower toyshop track/outdoor train_railway train_station/platform "
    "tree_farm tree_house trench underwater/coral_reef utility_room valley van_interior vegetable_garden veranda "
    "veterinarians_office viaduct videostore village vineyard volcano volleyball_court/indoor "
    "volleyball_court/outdoor waiting_room warehouse/indoor water_tower waterfall/block waterfall/fan "
    "waterfall/plunge watering_hole wave wet_bar wheat_field wind_farm windmill wine_cellar/barrel_storage "
    "wine_cellar/bottle_storage wrestling_ring/indoor yard youth_hostel"
).split())  # fmt: skip
_SUN397_IDS = {c: i for i, c in enumerate(SUN397_CLASSES)}
JPEG_OR_PNG = (b"\xff\xd8", b"\x89PNG")  # what --image-encoding source keeps (vtab_build._suffix)


def _missing_lists(paths: list[Path]) -> InputError:
    names = ", ".join(str(p) for p in paths)
    return InputError(f"{names}: not found (--source-format sun397-folder reads the extracted archive: "
                      f"{LAYOUTS['sun397-folder']})")  # fmt: skip


def _sun397_line(line: str) -> tuple[str, int] | None:
    """``/c/car_interior/backseat/sun_x.jpg`` -> (``c/car_interior/backseat/sun_x.jpg``, id of its folder)."""
    folder, _, name = line.rpartition("/")
    if not line.startswith("/") or not name.endswith(".jpg") or folder not in _SUN397_IDS:
        return None
    return line[1:], _SUN397_IDS[folder]


def sun397_source(path: Path, task, keep_encoded: bool = False) -> Source:
    root = path / "SUN397" if (path / "SUN397").is_dir() else path
    files = {name: path / name for name in SUN397_LISTS.values()}
    absent = [p for p in files.values() if not p.is_file()]
    if absent:
        raise _missing_lists(absent)
    what = "/<letter>/<class>[/<sub>]/<file>.jpg of one of SUN397's 397 classes (sun397_labels.txt)"
    splits: dict[str, list[Item]] = {}
    for split, name in SUN397_LISTS.items():
        splits[split] = []
        for n, line in _lines(files[name]):
            parsed = _sun397_line(line)
            if parsed is None:
                raise InputError(f"{files[name]}:{n}: {line!r} is not {what}")
            splits[split].append((parsed[0], root / parsed[0], parsed[1]))
    decoded: list[str] = []
    extra = {
        "tfds_builder": "tensorflow/datasets 003210498afdd2621dd0b4a2de2a83488e94d2c0 "
                        "tensorflow_datasets/image_classification/sun.py (Sun397, config tfds, 4.0.0)",
        "labels": f"the listed image's folder's position in TFDS's sun397_labels.txt (sha256 {SUN397_LABELS_SHA256})",
        "images": "each listed file at its native size, as Pillow decodes it (PNG) or its own bytes "
                  "(--image-encoding source); not TFDS's pixels: TFDS decodes with OpenCV to 3 channels, shrinks "
                  "images above 120,000 pixels and re-encodes them as JPEG",
        "skipped": "none: every listed image (TFDS's later builder skips two, _SUN397_IGNORE_IMAGES)",
    }  # fmt: skip
    if keep_encoded:
        extra["decoded_to_png"] = decoded  # filled while the build reads: the files kept as neither JPEG nor PNG
    src = image_source("sun397-folder", splits, files, keep_encoded, extra)
    if not keep_encoded:
        return src
    ordered = {split: sorted(items, key=_order_key) for split, items in splits.items()}  # src's order

    def read(split: str, indices: list[int]) -> Iterator[tuple[int, np.ndarray | bytes, int]]:
        for i, image, label in src.read(split, indices):
            if isinstance(image, bytes) and not image.startswith(JPEG_OR_PNG):  # GIF / BMP data named .jpg
                name, file, _ = ordered[split][i]
                try:
                    image = decode_image(image)
                except OSError as err:
                    raise InputError(f"{file}: not a readable image ({err})") from None
                decoded.append(name)
            yield i, image, label

    return dataclasses.replace(src, read=read)
