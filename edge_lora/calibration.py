"""Task-agnostic calibration text: what output errors are measured on when the user gives no prompts of their own.

A few thousand tokens of mixed registers (prose, instructions, dialogue, code, tables, numbers, dates, lists), written
for this project, so the activations cover what a small language model meets in general use rather than one task.
An adapter's own prompts (``--calibration-text FILE``) are better when the user has them.
"""

from __future__ import annotations

TEXTS: tuple[str, ...] = (
    "The river had been rising for three days before anyone in the village thought to move the boats. By the "
    "fourth morning the water stood a hand's width below the bridge, brown and fast, carrying branches, fence "
    "posts and once, to the children's delight, a complete wooden chair that turned slowly as it passed.",
    "To make a simple bread, mix 500 g of flour, 10 g of salt and 7 g of dried yeast in a large bowl. Add 350 ml "
    "of warm water and stir until no dry flour remains. Knead for ten minutes, cover, and leave it to rise for an "
    "hour, or until it has doubled in size. Shape the loaf, let it rest for 30 minutes, then bake at 220 °C for "
    "35 to 40 minutes.",
    "Q: What is the capital of Australia?\nA: Canberra. Many people guess Sydney, which is the largest city, but "
    "Canberra was chosen as a compromise between Sydney and Melbourne and became the capital in 1913.",
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n"
    "    total = 0.0\n    out = []\n    for i, v in enumerate(values):\n        total += v\n        if i >= window:\n"
    "            total -= values[i - window]\n        out.append(total / min(i + 1, window))\n    return out\n",
    "Meeting notes, Tuesday 14 March. Present: Ana, Ben, Chloe, Dev. 1. The release moves to April 2 because the "
    "installer still fails on older laptops. 2. Ben will write the migration guide by Friday. 3. Budget: we have "
    "spent 62% of the quarterly allowance; travel is frozen until July.",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts, water is split and oxygen is "
    "released, while carbon dioxide is fixed into sugars through the Calvin cycle. The overall reaction can be "
    "written as 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.",
    "\"Are you coming tonight?\" she asked.\n\"I don't know yet. It depends on whether the train is on time.\"\n"
    "\"It never is.\"\n\"Then I suppose I'm not coming,\" he said, and they both laughed.",
    "| city | population | area (km2) |\n|---|---:|---:|\n| Lisbon | 545,000 | 100 |\n| Porto | 232,000 | 41 |\n"
    "| Braga | 193,000 | 183 |\n| Coimbra | 140,000 | 319 |",
    "Shopping list: eggs (12), milk (2 litres), tomatoes, onions, rice, olive oil, coffee beans, dish soap, "
    "batteries (AA), a birthday card for Sam.",
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon. Neil Armstrong stepped onto the surface on "
    "July 20 at 10:56 p.m. Eastern time, followed about twenty minutes later by Buzz Aldrin, while Michael Collins "
    "orbited above in the command module.",
    "SELECT customer_id, COUNT(*) AS orders, SUM(total) AS revenue\nFROM orders\nWHERE created_at >= '2024-01-01'\n"
    "GROUP BY customer_id\nHAVING COUNT(*) > 3\nORDER BY revenue DESC\nLIMIT 10;",
    "Dear Ms. Okafor, thank you for your letter of 3 June. I am sorry to hear that the parcel arrived damaged. We "
    "have sent a replacement by express delivery, and it should reach you within two working days. Kind regards, "
    "Tom Lindqvist, Customer Service.",
    "The derivative of x^3 is 3x^2, and the integral of 1/x is ln|x| + C. If f(x) = sin(x) * e^x, then by the "
    "product rule f'(x) = cos(x) * e^x + sin(x) * e^x.",
    "Weather for the weekend: Saturday, sunny spells, highs of 21 degrees, light winds from the west. Sunday, "
    "cloudy with showers spreading from the south in the afternoon, highs of 17 degrees.",
    "const express = require('express');\nconst app = express();\napp.get('/health', (req, res) => {\n"
    "  res.json({ status: 'ok', uptime: process.uptime() });\n});\napp.listen(8080, () => console.log('listening'));",
    "Chess openings are often named after players or places: the Sicilian Defence, the Queen's Gambit, the Ruy "
    "Lopez. After 1. e4 c5 2. Nf3 d6 3. d4 cxd4 4. Nxd4 Nf6 5. Nc3 a6 we reach the Najdorf variation.",
    "Step 1: unplug the router. Step 2: wait thirty seconds. Step 3: plug it back in and wait until the light "
    "turns green. Step 4: if the light stays orange, press the reset button for ten seconds with a paperclip.",
    "The old lighthouse keeper kept a notebook of every ship he saw: 4 May, a trawler heading north; 9 May, two "
    "yachts; 17 May, a grey tanker that did not answer the radio. The last entry, dated 2 June, says only: fog.",
    "Prices rose by 3.2 percent over the year to October, down from 3.8 percent in September. Food prices rose "
    "5.1 percent, energy fell 1.4 percent, and the central bank kept its rate unchanged at 4.25 percent.",
    "User: Can you help me write a short poem about autumn?\nAssistant: Of course. Here is one:\nRed leaves on the "
    "path,\nthe low sun warm on the wall,\nsmoke from a far fire.",
    "Bees communicate the direction of food with a waggle dance. The angle of the dance relative to vertical "
    "shows the angle of the food relative to the sun, and the length of the waggle run shows the distance.",
    "git checkout -b fix/login-timeout\ngit add src/auth/session.py tests/test_session.py\ngit commit -m \"Extend "
    "the session timeout to 30 minutes\"\ngit push origin fix/login-timeout",
    "Population of the five largest countries (approximate, 2023): India 1.43 billion, China 1.41 billion, United "
    "States 335 million, Indonesia 278 million, Pakistan 240 million.",
    "She opened the box carefully. Inside, wrapped in yellowed newspaper, were seven glass marbles, a brass key, "
    "and a photograph of a house she had never seen, with a date on the back: 12/08/1958.",
    "Rules of the game: each player starts with five cards. On your turn, draw one card and play one card. A red "
    "card moves you forward two spaces, a blue card one space, and a black card sends another player back three.",
    "The train leaves platform 4 at 08:15 and arrives in Edinburgh at 12:47, with stops at York and Newcastle. "
    "Tickets cost 54 pounds for an open return, or 31 pounds if booked more than two weeks in advance.",
    "Error: connection refused (errno 111) while connecting to 10.0.0.12:5432. Check that the database server is "
    "running and that the firewall allows connections on port 5432.",
    "Volcanoes form where magma reaches the surface. Most lie along the boundaries of tectonic plates, such as "
    "the Pacific Ring of Fire, which contains about 75 percent of the world's active volcanoes.",
    "Counting in French: un, deux, trois, quatre, cinq, six, sept, huit, neuf, dix. In German: eins, zwei, drei, "
    "vier, fünf, sechs, sieben, acht, neun, zehn. In Spanish: uno, dos, tres, cuatro, cinco.",
    "My grandmother's advice was always the same: save a little every week, never lend what you cannot lose, and "
    "write your letters by hand. I have kept two of the three.",
)


def complete(model, tokenizer, adapter, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Each prompt followed by the adapted model's own greedy completion (up to ``max_new_tokens``, to a newline).

    The error that matters is the one where the adapter answers; prompts alone never reach those positions. The
    completions come from ``adapter`` on ``model`` (its base, by forward hooks that add ΔW·x, removed on return),
    so they need no labels: only the user's prompts.
    """
    import torch

    from edge_lora.errors import AdapterError
    from edge_lora.eval import torch_greedy_generate

    hooks = []

    def hook_for(m):
        B, A = m.B.float() * m.scale, m.A.float()
        bias = None if m.bias is None else m.bias.float() * m.scale

        def hook(_module, inputs, output):
            delta = (inputs[0] @ A.T) @ B.T
            return output + (delta + bias if bias is not None else delta)
        return hook

    try:
        for name, m in adapter.modules.items():
            layer = model.get_submodule(name)
            layer = getattr(layer, "base_layer", layer)
            if not isinstance(layer, torch.nn.Linear):
                raise AdapterError(f"{name}: completing calibration prompts covers Linear layers; this one is "
                                   f"{type(layer).__name__}. Give finished calibration text instead.")
            hooks.append(layer.register_forward_hook(hook_for(m)))
        out = []
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            out += [p + c.rstrip("\n") for p, c in zip(batch, torch_greedy_generate(model, tokenizer, batch, max_new_tokens))]
        return out
    finally:
        for h in hooks:
            h.remove()
