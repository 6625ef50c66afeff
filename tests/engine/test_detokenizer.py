from fireside.engine.detokenizer import Detokenizer


def test_multibyte_character_is_never_split():
    d = Detokenizer()
    data = "é".encode()
    d.add(data[:1])
    assert d.pop_text(final=False) == ""
    d.add(data[1:])
    assert d.pop_text(final=False) == "é"


def test_stop_across_pieces_included_and_held_back():
    d = Detokenizer(stop=("END",))
    assert not d.add(b"abc E")
    assert d.pop_text(final=False) == "abc "  # "E" may start the stop string
    assert not d.add(b"N")
    assert d.pop_text(final=False) == ""
    assert d.add(b"Dxyz")
    assert d.pop_text(final=True) == "END"
    assert d.text == "abc END"


def test_stop_excluded_on_request():
    d = Detokenizer(stop=("\n",), include_stop=False)
    assert d.add(b"line one\nline two")
    assert d.pop_text(final=True) == "line one"


def test_false_alarm_is_released():
    d = Detokenizer(stop=("END",))
    d.add(b"EN")
    assert d.pop_text(final=False) == ""
    d.add(b"Z")
    assert d.pop_text(final=False) == "ENZ"
